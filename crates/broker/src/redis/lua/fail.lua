-- Per job: p eid id att m err (a JSON string) run_at (0 = dead-letter).
-- run_at is the client's (its backoff decision, reported back to the caller); the events' time is Redis's.
-- Returns the 1-based positions of the rejected jobs.
local streams = { KEYS[1], KEYS[2], KEYS[3] } -- by priority: high, normal, low
local jobs_key = KEYS[4]
local sched_key = KEYS[5]
local events_key = KEYS[6]
local dead_key = KEYS[7]
local n = tonumber(ARGV[1])
local evmax = ARGV[2]
local deadmax = ARGV[3]
local actor = ARGV[4] -- the lease holder as a JSON string
local FIRST, EACH = 5, 7 -- n jobs from ARGV[FIRST] on, EACH values apiece (see above)
local now = clock_ms()
local rejected, i = {}, FIRST
local dead, retrying = group('job.dead', 'dead', now), group('job.retrying', 'retrying', now)
for k = 1, n do
  local p, eid, id, att, m, err, run_at = unpack(ARGV, i, i + EACH - 1)
  p = tonumber(p)
  i = i + EACH
  local key = streams[p + 1]
  local t = entry(key, eid)
  if t and redis.call('XACK', key, GROUP, eid) == 1 then
    if run_at == '0' then
      bury(dead_key, jobs_key, deadmax, t, att, p, err, now)
      add(dead, m, att, '{"error":' .. err .. '}')
    else
      t.a = att
      redis.call('ZADD', sched_key, run_at, id)
      redis.call('HSET', jobs_key, id, '["r",' .. run_at .. ',' .. att .. ',' .. cjson.encode(pack(t, p)) .. ',' .. err .. ']')
      add(retrying, m, att, '{"error":' .. err .. ',"run_at":' .. run_at .. '}')
    end
  else
    rejected[#rejected + 1] = k
  end
end
emit(events_key, evmax, { dead, retrying }, actor)
return rejected
