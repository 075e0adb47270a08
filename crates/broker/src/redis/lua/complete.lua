-- XACK's reply is the fence: 1 only while the entry is still pending. An entry leaves the pending list only
-- through a script that acknowledges it atomically (reclaim, release, cancel, complete, fail), so "still
-- pending" means "this lease is still current". The batch's records go in one HSET.
-- Returns the 1-based positions of the rejected jobs.
local streams = { KEYS[1], KEYS[2], KEYS[3] } -- by priority: high, normal, low
local jobs_key = KEYS[4]
local events_key = KEYS[5]
local n = tonumber(ARGV[1])
local evmax = ARGV[2]
local actor = ARGV[3] -- the lease holder as a JSON string
local FIRST, EACH = 4, 6 -- n jobs from ARGV[FIRST] on, EACH values apiece (p eid id att m result)
local now = clock_ms()
local at = ms_text(now) -- as text once: a number in a concatenation is formatted each time
local hset = { 'HSET', jobs_key }
local rejected = {}
local completed = group('job.completed', 'completed', now)
local i = FIRST
for k = 1, n do
  local p, eid, id, att, m, result = unpack(ARGV, i, i + EACH - 1)
  i = i + EACH
  if redis.call('XACK', streams[tonumber(p) + 1], GROUP, eid) == 1 then
    hset[#hset + 1] = id
    hset[#hset + 1] = '["c",' .. at .. ',' .. att .. ',' .. p .. ',"' .. eid .. '",' .. result .. ']'
    add(completed, m, att, result)
  else
    rejected[#rejected + 1] = k
  end
end
if #hset > 2 then redis.call(unpack(hset)) end
emit(events_key, evmax, { completed }, actor)
return rejected
