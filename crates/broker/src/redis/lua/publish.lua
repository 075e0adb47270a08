-- Publish on an application channel with history, in one step (no prelude: it needs none).
-- KEYS[1] the channel's history stream ferry:app:{c}:h, KEYS[2] the shard's epoch key ferry:epoch.
-- ARGV[1] the pub/sub channel ferry:app2:{c}, ARGV[2] the payload (JSON), ARGV[3] history size, ARGV[4] history
-- ttl in ms, ARGV[5] an epoch to set when the shard has none (a fresh UUIDv7 from the caller: scripts have no
-- good randomness).
-- The message goes out as "<offset> <epoch> <payload>": the offset is the history entry's id, so a listener
-- that missed it finds it by XRANGE. Returns the offset.
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[5]
  redis.call('SET', KEYS[2], epoch)
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'd', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', ARGV[1], id .. ' ' .. epoch .. ' ' .. ARGV[2])
return id
