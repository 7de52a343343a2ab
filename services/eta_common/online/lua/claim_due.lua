-- Claims the ready rows of one bucket that are due for re-materialisation (valid_until <= now): their
-- due time moves to now + lease, so a concurrent aggregator does not claim them too, and a claimer that
-- dies leaves them due again after the lease. KEYS: the bucket's due zset (restaurant_id -> valid_until
-- ms). ARGV: now (ms), lease_ms, limit. Returns the claimed restaurant ids.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
if #due == 0 then return due end
local lease = tonumber(ARGV[1]) + tonumber(ARGV[2])
local args = {}
for _, restaurant in ipairs(due) do
  args[#args + 1] = lease
  args[#args + 1] = restaurant
end
redis.call('ZADD', KEYS[1], unpack(args))
return due
