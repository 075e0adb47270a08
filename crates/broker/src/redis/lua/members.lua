-- The gateway membership (see redis/members.rs). Not prefixed by the prelude: it touches no job keys.
--
-- beat and list return {now_ms, json, json, ...}: every member whose expiry is still ahead. beat also drops
-- the expired members from both keys. leave returns 1.
local members_key = KEYS[1] -- ferry:gw: ZSET node id -> expiry, ms by this server's TIME
local info_key = KEYS[2] -- ferry:gw:info: HASH node id -> NodeInfo JSON with "heartbeat_ms" (this server's TIME)
local op = ARGV[1] -- "beat", "list" or "leave"
local node_id = ARGV[2] -- beat and leave (else empty)
local node_info = ARGV[3] -- beat: the NodeInfo JSON object (else empty)
local ttl_ms = ARGV[4] -- beat (else 0)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

if op == 'leave' then
  redis.call('ZREM', members_key, node_id)
  redis.call('HDEL', info_key, node_id)
  return 1
end

if op == 'beat' then
  local ttl = tonumber(ttl_ms)
  if string.sub(node_info, 1, 1) ~= '{' or string.len(node_info) < 3 then
    return redis.error_reply('ERR membership: NodeInfo must be a non-empty JSON object')
  end
  redis.call('ZADD', members_key, now + ttl, node_id)
  redis.call('HSET', info_key, node_id, '{"heartbeat_ms":' .. now .. ',' .. string.sub(node_info, 2))
  local dead = redis.call('ZRANGEBYSCORE', members_key, '-inf', now)
  for _, id in ipairs(dead) do
    redis.call('HDEL', info_key, id)
  end
  if #dead > 0 then
    redis.call('ZREMRANGEBYSCORE', members_key, '-inf', now)
  end
end

local out = {now}
local live = redis.call('ZRANGEBYSCORE', members_key, '(' .. now, '+inf')
for _, id in ipairs(live) do
  local info = redis.call('HGET', info_key, id)
  if info then
    out[#out + 1] = info
  end
end
return out
