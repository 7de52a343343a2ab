-- Applies a batch of updates to each of several restaurants (all of one cluster slot: on a single Redis,
-- any), each restaurant's in order, then re-materialises each restaurant's ready row. One call serves many
-- restaurants because every call costs the aggregator (packing, a reply to read) and Redis (a script
-- invocation) a fixed price; the writer bounds the restaurants per call so a call stays short.
-- KEYS: the row keys, rst:{R}:row; a restaurant's other keys share its hash tag and are derived from it
-- (rst:{R}:placed, :kitchen, :prep, :meta, :pickup and the per-order hashes rst:{R}:o:<order>, as
-- keys.restaurant_keys names them), so one key is sent per restaurant.
-- ARGV[1]: the call's header, '|'-separated: now (ms), retention_ms (placements), order_ttl_s,
-- kitchen_ttl_ms, prep_retention_ms, pickup_retention_ms, then the row's windows as comma-separated
-- milliseconds: the order-count windows, the prep-mean windows, the pickup-wait-mean windows (one argument
-- rather than nine: each argument costs the aggregator an encoding step per call).
-- ARGV[2]: one JSON array (decoded by Redis' built-in cjson: no per-argument overhead) with, per key, the
-- array of that restaurant's updates [type, order_id, event_ms, lat ('' if none), lng, writer span (''
-- if not sampled)] (event_ms, lat and lng as strings, kept exactly as written); ARGV[3], ARGV[4]:
-- optionally 'ahead' and the lookahead ms (the row timer; see the end). An empty update array only
-- re-materialises the row.
-- Returns, per key and joined by ';', "<flags>|<due>": one '0'/'1' "changed" flag per update, and when
-- the row timer should next look at this row (ms; the row's valid_until, '' when no window can change by
-- itself).
-- Per batch, not per update: the trims (at the batch's newest event time: a trim never changes a value
-- read at "now") and the group bookkeeping (u:/e:/t:) — the same end state with far fewer Redis calls.
local head = {}
do
  local from = 1
  while true do
    local bar = string.find(ARGV[1], '|', from, true)
    if not bar then head[#head + 1] = string.sub(ARGV[1], from); break end
    head[#head + 1] = string.sub(ARGV[1], from, bar - 1)
    from = bar + 1
  end
end
local now, retention, ttl, kitchen_ttl = head[1], tonumber(head[2]), tonumber(head[3]), tonumber(head[4])
local prep_retention, pickup_retention = tonumber(head[5]), tonumber(head[6])
local function windows(csv)
  local out = {}
  for w in string.gmatch(csv, '[^,]+') do out[#out + 1] = tonumber(w) end
  return out
end
local COUNTS, PREPS, PICKUPS = windows(head[7]), windows(head[8]), windows(head[9])
local real = tonumber(now)
local ahead, lookahead = ARGV[3] == 'ahead', tonumber(ARGV[4])

local function apply_one(rowkey, updates)
  local tag = string.sub(rowkey, 1, -4)  -- 'rst:{R}:'
  local placed, kitchen, prep = tag .. 'placed', tag .. 'kitchen', tag .. 'prep'
  local meta, pickup, prefix = tag .. 'meta', tag .. 'pickup', tag .. 'o:'
  local out = {}
  local groups = {}
  local trim_placed, trim_kitchen, trim_prep, trim_pickup = nil, nil, nil, nil
  local function pickup_wait(oid, picked, ready)
    local wait = picked - ready
    if wait < 0 then wait = 0 end
    redis.call('ZADD', pickup, picked, oid .. ':' .. wait)
    if not trim_pickup or picked > trim_pickup then trim_pickup = picked end
  end
  local lat, lng = nil, nil
  local function touch(group, ems, raw, ref)
    local g = groups[group]
    if not g then
      g = {ems = -1, raw = nil, ref = ''}
      groups[group] = g
    end
    if ref ~= '' then g.ref = ref end
    if ems > g.ems then g.ems = ems; g.raw = raw end
  end
  for n, u in ipairs(updates) do
    local etype, oid, raw, ref = u[1], u[2], u[3], u[6]
    local ems = tonumber(raw)
    local okey = prefix .. oid
    local changed = '0'
    if u[4] ~= '' then lat, lng = u[4], u[5] end
    if etype == 'PLACED' then
      if redis.call('ZADD', placed, 'NX', ems, oid) == 1 then changed = '1' end
      if not trim_placed or ems > trim_placed then trim_placed = ems end
      touch('orders', ems, raw, ref)
    elseif etype == 'ORDER_ACCEPTED' then
      if redis.call('HSETNX', okey, 'accepted', raw) == 1 then
        changed = '1'
        redis.call('EXPIRE', okey, ttl)
        local ready = redis.call('HGET', okey, 'ready')
        if ready then
          redis.call('ZADD', prep, ready, oid .. ':' .. (tonumber(ready) - ems))
        elseif not redis.call('HGET', okey, 'cancelled') then
          redis.call('ZADD', kitchen, ems, oid)
        end
      end
      if not trim_kitchen or ems > trim_kitchen then trim_kitchen = ems end
      touch('kitchen', ems, raw, ref)
    elseif etype == 'ORDER_READY' then
      if redis.call('HSETNX', okey, 'ready', raw) == 1 then
        changed = '1'
        redis.call('EXPIRE', okey, ttl)
        redis.call('ZREM', kitchen, oid)
        local accepted = redis.call('HGET', okey, 'accepted')
        if accepted then
          redis.call('ZADD', prep, ems, oid .. ':' .. (ems - tonumber(accepted)))
        end
        local picked = redis.call('HGET', okey, 'picked')
        if picked then pickup_wait(oid, tonumber(picked), ems) end
      end
      if not trim_prep or ems > trim_prep then trim_prep = ems end
      touch('kitchen', ems, raw, ref)
    elseif etype == 'PICKED_UP' then
      if redis.call('HSETNX', okey, 'picked', raw) == 1 then
        changed = '1'
        redis.call('EXPIRE', okey, ttl)
        local ready = redis.call('HGET', okey, 'ready')
        if ready then pickup_wait(oid, ems, tonumber(ready)) end
      end
      touch('pickup', ems, raw, ref)
    elseif etype == 'CANCELLED' then
      if redis.call('HSETNX', okey, 'cancelled', raw) == 1 then
        changed = '1'
        redis.call('EXPIRE', okey, ttl)
        redis.call('ZREM', kitchen, oid)
      end
      touch('kitchen', ems, raw, ref)
    elseif etype == 'OPENED' or etype == 'CLOSED' or etype == 'BUSY' then
      local prev = tonumber(redis.call('HGET', meta, 'status_ms') or '-1')
      if ems > prev then
        redis.call('HSET', meta, 'status', etype, 'status_ms', raw)
        changed = '1'
      end
      touch('status', ems, raw, ref)
    end
    out[n] = changed
  end
  if trim_placed then redis.call('ZREMRANGEBYSCORE', placed, '-inf', '(' .. (trim_placed - retention)) end
  if trim_kitchen then redis.call('ZREMRANGEBYSCORE', kitchen, '-inf', '(' .. (trim_kitchen - kitchen_ttl)) end
  if trim_prep then redis.call('ZREMRANGEBYSCORE', prep, '-inf', '(' .. (trim_prep - prep_retention)) end
  if trim_pickup then
    redis.call('ZREMRANGEBYSCORE', pickup, '-inf', '(' .. (trim_pickup - pickup_retention))
  end
  local fields = {}
  if lat then fields[#fields + 1] = 'lat'; fields[#fields + 1] = lat; fields[#fields + 1] = 'lng'
    fields[#fields + 1] = lng end
  for group, g in pairs(groups) do
    fields[#fields + 1] = 'u:' .. group; fields[#fields + 1] = now
    if g.ref ~= '' then fields[#fields + 1] = 't:' .. group; fields[#fields + 1] = g.ref end
    local prev = tonumber(redis.call('HGET', meta, 'e:' .. group) or '0')
    if g.ems > prev then fields[#fields + 1] = 'e:' .. group; fields[#fields + 1] = g.raw end
  end
  if #fields > 0 then redis.call('HSET', meta, unpack(fields)) end

  -- The ready row: every windowed value at instant t, exactly as a read at t computes it from the sorted
  -- sets, and valid_until: the earliest instant after t a window's value changes with no new event (the
  -- oldest member in a window leaves it at score + W; a member dated after t enters at its score). A read
  -- at t' with t <= t' < valid_until is therefore exact.
  local function materialize(t)
    local vu = nil
    local function until_(at) if not vu or at < vu then vu = at end end
    local function oldest(key, low, w)  -- the first member in (low, t] leaves the window at score + w
      local first = redis.call('ZRANGEBYSCORE', key, '(' .. low, t, 'WITHSCORES', 'LIMIT', 0, 1)
      if first[2] then until_(tonumber(first[2]) + w) end
    end
    local function upcoming(key)  -- a member dated after t enters the windows at its score
      local nxt = redis.call('ZRANGEBYSCORE', key, '(' .. t, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
      if nxt[2] then until_(tonumber(nxt[2])) end
    end
    local row = {'r1', string.format('%d', t), ''}
    for _, w in ipairs(COUNTS) do
      local low = t - w
      row[#row + 1] = redis.call('ZCOUNT', placed, '(' .. low, t)
      oldest(placed, low, w)
    end
    upcoming(placed)
    local klow = t - kitchen_ttl
    row[#row + 1] = redis.call('ZCOUNT', kitchen, '(' .. klow, '+inf')
    local kfirst = redis.call('ZRANGEBYSCORE', kitchen, '(' .. klow, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    if kfirst[2] then until_(tonumber(kfirst[2]) + kitchen_ttl) end
    local function means(key, list)  -- per window "sum|n" of the values after each member's last ':'
      for _, w in ipairs(list) do
        local low = t - w
        local members = redis.call('ZRANGEBYSCORE', key, '(' .. low, t)
        local sum = 0
        for _, m in ipairs(members) do sum = sum + tonumber(string.match(m, '[^:]*$')) end
        row[#row + 1] = string.format('%d', sum)
        row[#row + 1] = #members
        if #members > 0 then oldest(key, low, w) end
      end
      if #list > 0 then upcoming(key) end
    end
    means(prep, PREPS)
    means(pickup, PICKUPS)
    local fields = redis.call('HMGET', meta, 'status', 'lat', 'lng', 'u:orders', 'e:orders', 't:orders',
      'u:kitchen', 'e:kitchen', 't:kitchen', 'u:status', 'e:status', 't:status', 'u:pickup', 'e:pickup',
      't:pickup')
    for i = 1, 15 do row[#row + 1] = fields[i] or '' end
    if vu then row[3] = string.format('%d', vu) end
    return table.concat(row, '|'), row[3]
  end

  if not ahead then
    -- an update (or a plain re-materialisation) at `now`: the row as of now; a row computed ahead of time
    -- no longer holds (it lacks these updates)
    local text, vu = materialize(real)
    redis.call('HSET', rowkey, 'w', text)
    redis.call('HDEL', rowkey, 'n')
    return table.concat(out) .. '|' .. vu
  end
  -- The row timer, ahead of time (ARGV[4]: lookahead ms): the row as of the current row's valid_until
  -- goes to field n (a read uses whichever of w and n is valid), so readers never wait for the timer at
  -- an edge. A waiting n whose time has come is promoted to w first; one still in the future is kept, and
  -- the next call is due when it can be promoted.
  local cur = redis.call('HGET', rowkey, 'w')
  local nxt = redis.call('HGET', rowkey, 'n')
  if nxt then
    local ncomputed = tonumber(string.match(nxt, '^r1|(%d+)|'))
    if ncomputed > real then return '|' .. string.format('%d', ncomputed + lookahead) end
    redis.call('HSET', rowkey, 'w', nxt)
    redis.call('HDEL', rowkey, 'n')
    cur = nxt
  end
  local at = real
  if cur then
    local until_text = string.match(cur, '^r1|%d+|(%d*)|')
    if until_text == '' then return '|' end  -- nothing changes by itself
    if until_text then at = math.max(real, tonumber(until_text)) end
  end
  local text, vu = materialize(at)
  if at > real then redis.call('HSET', rowkey, 'n', text) else redis.call('HSET', rowkey, 'w', text) end
  return '|' .. vu
end

local all = cjson.decode(ARGV[2])
local results = {}
for i, rowkey in ipairs(KEYS) do results[i] = apply_one(rowkey, all[i]) end
return table.concat(results, ';')
