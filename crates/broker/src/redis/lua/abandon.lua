-- A claim call whose caller gave up on it (the reply timed out, or the caller stopped waiting): hand back the
-- jobs it leased, if it ran, without charging the attempt (like release.lua), and mark its key so that, if its
-- request is still on the way (queued behind a dead link), it takes nothing when it arrives. Both scripts are
-- atomic, so whichever runs first the other sees it: no job stays leased to a caller that is not waiting for it.
-- Returns how many jobs were handed back.
local streams = { KEYS[1], KEYS[2], KEYS[3] } -- by priority: high, normal, low
local jobs_key = KEYS[4]
local events_key = KEYS[5]
local claim_key = KEYS[6]
local evmax = ARGV[1]
local mark_ttl_ms = ARGV[2]
local actor = ARGV[3] -- the claiming consumer, as a JSON string
local rec = redis.call('GET', claim_key)
redis.call('SET', claim_key, 'x', 'PX', mark_ttl_ms)
if not rec or rec == 'x' then return 0 end
local queued = group('job.queued', 'queued', clock_ms())
local n = 0
-- The claim noted the ranges it read ("p|first|last", see complete_claim.lua): every entry in one was leased by it.
for p, first, last in string.gmatch(rec, '(%d)|([%d%-]+)|([%d%-]+)') do
  local key = streams[tonumber(p) + 1]
  for _, e in ipairs(redis.call('XRANGE', key, first, last)) do
    local eid, f = e[1], e[2]
    local t = {}
    for i = 1, #f, 2 do t[f[i]] = f[i + 1] end
    -- Still pending means still this claim's lease: only the reaper (which acknowledges at once) or a holder
    -- that knows the lease could have moved it, and the caller never learnt of it.
    if redis.call('XACK', key, GROUP, eid) == 1 then
      local nid = redis.call('XADD', key, '*', 'id', t.id, 'm', t.m, 'a', t.a, 'x', t.x, 'j', t.j)
      redis.call('HSET', jobs_key, t.id, '["q",' .. p .. ',"' .. nid .. '"]')
      add(queued, t.m, t.a, '{"released":true}')
      n = n + 1
    end
  end
end
emit(events_key, evmax, { queued }, actor)
return n
