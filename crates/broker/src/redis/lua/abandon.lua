-- KEYS: p0 p1 p2 jobs events claim
-- ARGV: evmax mark_ttl_ms actor
-- A claim call whose caller gave up on it (the reply timed out, or the caller stopped waiting): hand back the
-- jobs it leased, if it ran, without charging the attempt (like release.lua), and mark its key so that, if its
-- request is still on the way (queued behind a dead link), it takes nothing when it arrives. Both scripts are
-- atomic, so whichever runs first the other sees it: no job stays leased to a caller that is not waiting for it.
-- Returns how many jobs were handed back.
local rec = redis.call('GET', KEYS[6])
redis.call('SET', KEYS[6], 'x', 'PX', ARGV[2])
if not rec or rec == 'x' then return 0 end
local queued = group('job.queued', 'queued', clock_ms())
local n = 0
for p, eid in string.gmatch(rec, '(%d)|(%S+)') do
  local key = KEYS[tonumber(p) + 1]
  local t = entry(key, eid)
  -- Still pending means still this claim's lease: only the reaper (which acknowledges at once) or a holder that
  -- knows the lease could have moved it, and the caller never learnt of it.
  if t and redis.call('XACK', key, GROUP, eid) == 1 then
    local nid = redis.call('XADD', key, '*', 'id', t.id, 'm', t.m, 'a', t.a, 'x', t.x, 'j', t.j)
    redis.call('HSET', KEYS[4], t.id, '["q",' .. p .. ',"' .. nid .. '"]')
    add(queued, t.m, t.a, '{"released":true}')
    n = n + 1
  end
end
emit(KEYS[5], ARGV[1], { queued }, ARGV[3])
return n
