-- Returns {'abandoned'}, {'paused'}, {'empty', last0, last1, last2} (ids to block on), or
-- {'jobs', p, eid, id, a, j, ...} (the caller rebuilds `m` from the spec: returning it would cost Redis more
-- than it saves the caller).
-- The claim itself is XREADGROUP: the pending entry (owner + delivery) is the lease, so no per-job write here
-- (one per call: the claim key below).
-- claim_key is this claim call's own key (a token the caller draws per call): the leases taken are noted there for
-- claim_ttl_ms, so that if the caller gives up on the call (its reply timed out or never came) abandon.lua can
-- hand them back uncharged; a claim that arrives after abandon.lua marked the key takes nothing.
local streams = { KEYS[1], KEYS[2], KEYS[3] } -- by priority: high, normal, low
local paused_key = KEYS[4]
local events_key = KEYS[5]
local claim_key = KEYS[6]
local consumer = ARGV[1]
local max = tonumber(ARGV[2])
local evmax = ARGV[3]
local actor = ARGV[4] -- the consumer as a JSON string
local claim_ttl_ms = ARGV[5]
if redis.call('EXISTS', claim_key) == 1 then return { 'abandoned' } end
if redis.call('EXISTS', paused_key) == 1 then return { 'paused' } end
local remaining = max
local now, taken = clock_ms(), {}
local out, active = { 'jobs' }, group('job.active', 'active', now)
for p = 0, 2 do
  if remaining <= 0 then break end
  local key = streams[p + 1]
  local res = redis.pcall('XREADGROUP', 'GROUP', GROUP, consumer, 'COUNT', remaining, 'STREAMS', key, '>')
  if type(res) == 'table' and res.err then
    -- The group does not exist yet (stream created by a promote or retry before any enqueue registered it).
    redis.call('XGROUP', 'CREATE', key, GROUP, '0', 'MKSTREAM')
    res = redis.call('XREADGROUP', 'GROUP', GROUP, consumer, 'COUNT', remaining, 'STREAMS', key, '>')
  end
  if res then
    local entries = res[1][2]
    for e = 1, #entries do
      local eid, f = entries[e][1], entries[e][2]
      -- fields in write order: id m a x j
      local id, m, a, j = f[2], f[4], f[6], f[10]
      out[#out + 1] = p
      out[#out + 1] = eid
      out[#out + 1] = id
      out[#out + 1] = a
      out[#out + 1] = j
      taken[#taken + 1] = p .. '|' .. eid
      add(active, m, a + 1)
    end
    remaining = remaining - #entries
  end
end
if #active.jobs == 0 then
  local last = { 'empty' }
  for p = 1, 3 do
    local r = redis.call('XREVRANGE', streams[p], '+', '-', 'COUNT', 1)
    last[#last + 1] = (#r > 0) and r[1][1] or '0-0'
  end
  return last
end
redis.call('SET', claim_key, table.concat(taken, ' '), 'PX', claim_ttl_ms)
emit(events_key, evmax, { active }, actor)
return out
