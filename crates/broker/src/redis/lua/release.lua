-- KEYS: p0 p1 p2 jobs events
-- ARGV: n evmax, then 4 per lease: p eid id m, then the actor
-- Gives leased jobs back at the tail of their stream; the attempt is not counted (the entry's `a` is unchanged).
local n, evmax, now = tonumber(ARGV[1]), ARGV[2], clock_ms()
local released, i = {}, 3
local queued = group('job.queued', 'queued', now)
for k = 1, n do
  local p, eid, id, m = tonumber(ARGV[i]), ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  i = i + 4
  local key = KEYS[p + 1]
  local t = entry(key, eid)
  if t and redis.call('XACK', key, GROUP, eid) == 1 then
    local nid = redis.call('XADD', key, '*', 'id', t.id, 'm', t.m, 'a', t.a, 'x', t.x, 'j', t.j)
    redis.call('HSET', KEYS[4], id, '["q",' .. p .. ',"' .. nid .. '"]')
    add(queued, m, t.a, '{"released":true}')
    released[#released + 1] = k
  end
end
emit(KEYS[5], evmax, { queued }, ARGV[3 + n * 4])
return released
