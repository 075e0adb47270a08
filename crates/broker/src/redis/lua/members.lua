-- The gateway membership (see redis/members.rs). Not prefixed by the prelude: it touches no job keys.
--
-- KEYS[1] ferry:gw       ZSET node id -> expiry, ms by this server's TIME
-- KEYS[2] ferry:gw:info  HASH node id -> NodeInfo JSON with "heartbeat_ms" (this server's TIME) spliced in
-- ARGV[1] op: "beat" (ARGV[2] id, ARGV[3] NodeInfo JSON object, ARGV[4] ttl ms), "list", "leave" (ARGV[2] id)
--
-- beat and list return {now_ms, json, json, ...}: every member whose expiry is still ahead. beat also drops
-- the expired members from both keys. leave returns 1.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op = ARGV[1]

if op == 'leave' then
  redis.call('ZREM', KEYS[1], ARGV[2])
  redis.call('HDEL', KEYS[2], ARGV[2])
  return 1
end

if op == 'beat' then
  local ttl = tonumber(ARGV[4])
  local info = ARGV[3]
  if string.sub(info, 1, 1) ~= '{' or string.len(info) < 3 then
    return redis.error_reply('ERR membership: NodeInfo must be a non-empty JSON object')
  end
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
  redis.call('HSET', KEYS[2], ARGV[2], '{"heartbeat_ms":' .. now .. ',' .. string.sub(info, 2))
  local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
  for _, id in ipairs(dead) do
    redis.call('HDEL', KEYS[2], id)
  end
  if #dead > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  end
end

local out = {now}
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
for _, id in ipairs(live) do
  local info = redis.call('HGET', KEYS[2], id)
  if info then
    out[#out + 1] = info
  end
end
return out
