-- KEYS: p0 p1 p2 paused events claim
-- ARGV: consumer max evmax actor claim_ttl_ms
-- Returns {'abandoned'}, {'paused'}, {'empty', last0, last1, last2} (ids to block on), or
-- {'jobs', p, eid, id, a, j, ...} (the caller rebuilds `m` from the spec: returning it would cost Redis more
-- than it saves the caller).
-- The claim itself is XREADGROUP: the pending entry (owner + delivery) is the lease, so no per-job write here
-- (one per call: the claim key below).
-- KEYS[6] is this claim call's own key (a token the caller draws per call): the leases taken are noted there for
-- claim_ttl_ms, so that if the caller gives up on the call (its reply timed out or never came) abandon.lua can
-- hand them back uncharged; a claim that arrives after abandon.lua marked the key takes nothing.
if redis.call('EXISTS', KEYS[6]) == 1 then return { 'abandoned' } end
if redis.call('EXISTS', KEYS[4]) == 1 then return { 'paused' } end
local consumer, remaining, evmax = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local now, taken = clock_ms(), {}
local out, active = { 'jobs' }, group('job.active', 'active', now)
for p = 0, 2 do
  if remaining <= 0 then break end
  local key = KEYS[p + 1]
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
    local r = redis.call('XREVRANGE', KEYS[p], '+', '-', 'COUNT', 1)
    last[#last + 1] = (#r > 0) and r[1][1] or '0-0'
  end
  return last
end
redis.call('SET', KEYS[6], table.concat(taken, ' '), 'PX', ARGV[5])
emit(KEYS[5], evmax, { active }, ARGV[4])
return out
