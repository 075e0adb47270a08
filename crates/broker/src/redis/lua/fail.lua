-- KEYS: p0 p1 p2 jobs sched events dead
-- ARGV: n evmax deadmax, then 7 per job: p eid id attempt m err(JSON string) run_at (0 = dead-letter), then
--   the actor
-- run_at is the client's (its backoff decision, reported back to the caller); the events' time is Redis's.
local n, evmax, deadmax, now = tonumber(ARGV[1]), ARGV[2], ARGV[3], clock_ms()
local rejected, i = {}, 4
local dead, retrying = group('job.dead', 'dead', now), group('job.retrying', 'retrying', now)
for k = 1, n do
  local p, eid, id, att, m, err, run_at = tonumber(ARGV[i]), ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6]
  i = i + 7
  local key = KEYS[p + 1]
  local t = entry(key, eid)
  if t and redis.call('XACK', key, GROUP, eid) == 1 then
    if run_at == '0' then
      bury(KEYS[7], KEYS[4], deadmax, t, att, p, err, now)
      add(dead, m, att, '{"error":' .. err .. '}')
    else
      t.a = att
      redis.call('ZADD', KEYS[5], run_at, id)
      redis.call('HSET', KEYS[4], id, '["r",' .. run_at .. ',' .. att .. ',' .. cjson.encode(pack(t, p)) .. ',' .. err .. ']')
      add(retrying, m, att, '{"error":' .. err .. ',"run_at":' .. run_at .. '}')
    end
  else
    rejected[#rejected + 1] = k
  end
end
emit(KEYS[6], evmax, { dead, retrying }, ARGV[4 + n * 7])
return rejected
