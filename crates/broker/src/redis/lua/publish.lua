-- Publish on an application channel with history, in one step (no prelude: it needs none).
-- The message goes out as "<offset> <epoch> <payload>": the offset is the history entry's id, so a listener
-- that missed it finds it by XRANGE. Returns the offset.
local history_key = KEYS[1] -- the channel's history stream, <prefix>app:{c}:h
local epoch_key = KEYS[2] -- the shard's epoch key, <prefix>epoch
local channel = ARGV[1] -- the pub/sub channel, <prefix>app2:{c}
local payload = ARGV[2] -- JSON
local size = ARGV[3] -- how many messages the history keeps
local ttl_ms = ARGV[4] -- how long the history lives after the last publish
local fresh_epoch = ARGV[5] -- set when the shard has none (a UUIDv7 from the caller: scripts have no good randomness)
local epoch = redis.call('GET', epoch_key)
if not epoch then
  epoch = fresh_epoch
  redis.call('SET', epoch_key, epoch)
end
local id = redis.call('XADD', history_key, 'MAXLEN', '~', size, '*', 'd', payload)
redis.call('PEXPIRE', history_key, ttl_ms)
-- 'ferry:{' starts the keys of a shard of a Redis Cluster (keys.rs, Layout): it publishes in its own slot.
local publish = 'PUBLISH'
if string.byte(epoch_key, 7) == 123 then publish = 'SPUBLISH' end
redis.call(publish, channel, id .. ' ' .. epoch .. ' ' .. payload)
return id
