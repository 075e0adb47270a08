-- KEYS: p0 p1 p2 jobs events
-- ARGV: now n evmax, then 6 per job: p eid id attempt m result
-- XACK's reply is the fence: 1 only while the entry is still pending, i.e. the lease was never reclaimed,
-- released or cancelled (each of those acknowledges the entry atomically).
local now, n, evmax = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local rejected, i = {}, 4
local completed = group('job.completed', 'completed', now)
for k = 1, n do
  local p, eid, id, att, m, result = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  i = i + 6
  if redis.call('XACK', KEYS[tonumber(p) + 1], 'workers', eid) == 1 then
    redis.call('HSET', KEYS[4], id, '["c",' .. now .. ',' .. att .. ',' .. p .. ',"' .. eid .. '",' .. result .. ']')
    add(completed, m, att, result)
  else
    rejected[#rejected + 1] = k
  end
end
emit(KEYS[5], evmax, { completed })
return rejected
