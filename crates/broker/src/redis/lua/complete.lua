-- KEYS: p0 p1 p2 jobs events
-- ARGV: n evmax, then 6 per job: p eid id attempt m result, then the actor
-- XACK's reply is the fence: 1 only while the entry is still pending. An entry leaves the pending list only
-- through a script that acknowledges it atomically (reclaim, release, cancel, complete, fail), so "still
-- pending" means "this lease is still current". The batch's records go in one HSET.
local n, evmax, now = tonumber(ARGV[1]), ARGV[2], clock_ms()
local hset = { 'HSET', KEYS[4] }
local rejected = {}
local completed = group('job.completed', 'completed', now)
local i = 3
for k = 1, n do
  local p, eid, id, att, m, result = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  i = i + 6
  if redis.call('XACK', KEYS[tonumber(p) + 1], GROUP, eid) == 1 then
    hset[#hset + 1] = id
    hset[#hset + 1] = '["c",' .. now .. ',' .. att .. ',' .. p .. ',"' .. eid .. '",' .. result .. ']'
    add(completed, m, att, result)
  else
    rejected[#rejected + 1] = k
  end
end
if #hset > 2 then redis.call(unpack(hset)) end
emit(KEYS[5], evmax, { completed }, ARGV[3 + n * 6])
return rejected
