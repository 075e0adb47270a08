-- Moves up to max scheduled or retrying jobs that are due into their streams. Returns how many.
local streams = { KEYS[1], KEYS[2], KEYS[3] } -- by priority: high, normal, low
local jobs_key = KEYS[4]
local sched_key = KEYS[5]
local events_key = KEYS[6]
local max = ARGV[1]
local evmax = ARGV[2]
-- Due by Redis's clock, one clock for every promoter however far their own clocks drift.
local now = clock_ms()
local due = redis.call('ZRANGEBYSCORE', sched_key, '-inf', now, 'LIMIT', 0, max)
local queued = group('job.queued', 'queued', now)
for _, id in ipairs(due) do
  redis.call('ZREM', sched_key, id)
  local rec = redis.call('HGET', jobs_key, id)
  if rec and (state_of(rec) == 's' or state_of(rec) == 'r') then
    local t = cjson.decode(cjson.decode(rec)[4])
    local p = tonumber(t.p)
    local eid = redis.call('XADD', streams[p + 1], '*', 'id', t.id, 'm', t.m, 'a', t.a, 'x', t.x, 'j', t.j)
    redis.call('HSET', jobs_key, id, '["q",' .. p .. ',"' .. eid .. '"]')
    add(queued, t.m, t.a)
  end
end
emit(events_key, evmax, { queued })
return #queued.jobs
