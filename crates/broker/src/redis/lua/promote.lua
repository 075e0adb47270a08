-- KEYS: p0 p1 p2 jobs sched events
-- ARGV: max evmax
-- Due by Redis's clock, one clock for every promoter however far their own clocks drift.
local max, evmax, now = ARGV[1], ARGV[2], clock_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now, 'LIMIT', 0, max)
local queued = group('job.queued', 'queued', now)
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[5], id)
  local rec = redis.call('HGET', KEYS[4], id)
  if rec and (state_of(rec) == 's' or state_of(rec) == 'r') then
    local t = cjson.decode(cjson.decode(rec)[4])
    local p = tonumber(t.p)
    local eid = redis.call('XADD', KEYS[p + 1], '*', 'id', t.id, 'm', t.m, 'a', t.a, 'x', t.x, 'j', t.j)
    redis.call('HSET', KEYS[4], id, '["q",' .. p .. ',"' .. eid .. '"]')
    add(queued, t.m, t.a)
  end
end
emit(KEYS[6], evmax, { queued })
return #queued.jobs
