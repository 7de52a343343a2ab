-- Applies a batch of city-level updates in order. KEYS: free (geo), state, meta, waiting, settled.
-- ARGV: now, waiting_retention_ms, settled_retention_ms, then the updates as one JSON array of
-- [type, driver_id, order_id, event_ms, lat, lng, writer span ('' if not sampled)], all strings.
-- Types PLACED and CANCELLED are dispatch entries (order events forwarded by the writer; driver_id,
-- lat and lng are ''); every other type is a driver event. Returns a string of one '0'/'1' "changed"
-- flag per update. The backlog trims run once, at the batch's newest event times.
local free, state, meta, waiting, settled = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now, waiting_retention, settled_retention = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local updates = cjson.decode(ARGV[4])
local out = {}
local max_ems = tonumber(redis.call('HGET', meta, 'e:drivers') or '0')
local max_raw = nil
local last_ref = ''
local drivers_seen = false
local dmax_ems = tonumber(redis.call('HGET', meta, 'e:dispatch') or '0')
local dmax_raw = nil
local dlast_ref = ''
local dispatch_seen = false
local trim_waiting, trim_settled = nil, nil
local function settle(oid, ems, raw, ref)
  dispatch_seen = true
  if ref ~= '' then dlast_ref = ref end
  if ems > dmax_ems then dmax_ems = ems; dmax_raw = raw end
  local changed = redis.call('ZADD', settled, 'NX', ems, oid)
  changed = changed + redis.call('ZREM', waiting, oid)
  if not trim_settled or ems > trim_settled then trim_settled = ems end
  if changed > 0 then return '1' end
  return '0'
end
for n, u in ipairs(updates) do
  local etype, did, oid, raw = u[1], u[2], u[3], u[4]
  local lat, lng, ref = u[5], u[6], u[7]
  local ems = tonumber(raw)
  if etype == 'PLACED' then
    dispatch_seen = true
    if ref ~= '' then dlast_ref = ref end
    if ems > dmax_ems then dmax_ems = ems; dmax_raw = raw end
    local changed = '0'
    if not redis.call('ZSCORE', settled, oid) then
      if redis.call('ZADD', waiting, 'NX', ems, oid) == 1 then changed = '1' end
    end
    if not trim_waiting or ems > trim_waiting then trim_waiting = ems end
    out[n] = changed
  elseif etype == 'CANCELLED' then
    out[n] = settle(oid, ems, raw, ref)
  else
    drivers_seen = true
    if ref ~= '' then last_ref = ref end
    local changed = '0'
    if etype == 'ASSIGNED' and oid ~= '' then changed = settle(oid, ems, raw, ref) end
    local status, last = 'offline', -1
    local cur = redis.call('HGET', state, did)
    if cur then
      local sep = string.find(cur, '|', 1, true)
      status = string.sub(cur, 1, sep - 1)
      last = tonumber(string.sub(cur, sep + 1))
    end
    if ems > last then
      if etype == 'ONLINE' or etype == 'DELIVERED' then status = 'free'
      elseif etype == 'OFFLINE' then status = 'offline'
      elseif etype == 'ASSIGNED' then status = 'busy' end
      redis.call('HSET', state, did, status .. '|' .. raw)
      if status == 'free' then
        redis.call('GEOADD', free, lng, lat, did)
      else
        redis.call('ZREM', free, did)
      end
      if ems > max_ems then max_ems = ems; max_raw = raw end
      changed = '1'
    end
    out[n] = changed
  end
end
if trim_waiting then
  redis.call('ZREMRANGEBYSCORE', waiting, '-inf', '(' .. (trim_waiting - waiting_retention))
end
if trim_settled then
  redis.call('ZREMRANGEBYSCORE', settled, '-inf', '(' .. (trim_settled - settled_retention))
end
if drivers_seen then
  redis.call('HSET', meta, 'u:drivers', now)
  if max_raw then redis.call('HSET', meta, 'e:drivers', max_raw) end
  if last_ref ~= '' then redis.call('HSET', meta, 't:drivers', last_ref) end
end
if dispatch_seen then
  redis.call('HSET', meta, 'u:dispatch', now)
  if dmax_raw then redis.call('HSET', meta, 'e:dispatch', dmax_raw) end
  if dlast_ref ~= '' then redis.call('HSET', meta, 't:dispatch', dlast_ref) end
end
return table.concat(out)
