-- One aggregator says when it was last current (every event it fetched visible), and the store's
-- freshness is recomputed: the oldest such instant among the aggregators heard from within live_ms, in
-- field '@current' as "<ms>|<computed at ms>" (one HMGET for a reader). Aggregators silent for forget_ms
-- are dropped. KEYS: the aggregators hash. ARGV: member, caught_up_ms, now_ms, live_ms, forget_ms.
-- Returns the store's freshness instant (false when no aggregator is live).
local key, member = KEYS[1], ARGV[1]
local now, live, forget = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('HSET', key, member, ARGV[2] .. '|' .. ARGV[3])
local all = redis.call('HGETALL', key)
local least = nil
for i = 1, #all, 2 do
  local name, value = all[i], all[i + 1]
  if name ~= '@current' then
    local sep = string.find(value, '|', 1, true)
    local caught, written = tonumber(string.sub(value, 1, sep - 1)), tonumber(string.sub(value, sep + 1))
    if now - written > forget then
      redis.call('HDEL', key, name)
    elseif now - written <= live and (not least or caught < least) then
      least = caught
    end
  end
end
if not least then return false end
redis.call('HSET', key, '@current', string.format('%d', least) .. '|' .. ARGV[3])
return string.format('%d', least)
