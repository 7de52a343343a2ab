-- Marks the online store initialized at the end of a rebuild — only if no flush (or newer rebuild)
-- happened since this rebuild began: the key still holds this rebuild's token. KEYS: the initialized key.
-- ARGV: "rebuilding:<token>", the value to set (now, ms). Returns 1 when marked, 0 when not.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
return 0
