-- Puts a dead job back at the tail of its stream with its attempts reset. Returns {'ok'}, {'nf'} or
-- {'nd', state_letter} (the job is not dead).
local streams = { KEYS[1], KEYS[2], KEYS[3] } -- by priority: high, normal, low
local jobs_key = KEYS[4]
local dead_key = KEYS[5]
local events_key = KEYS[6]
local id = ARGV[1]
local evmax = ARGV[2]
local now = clock_ms()
local rec = redis.call('HGET', jobs_key, id)
if not rec then return { 'nf' } end
if state_of(rec) ~= 'd' then return { 'nd', state_of(rec) } end
local did = string.match(rec, '^%["d",%d+,%d+,"([^"]+)"')
local t = entry(dead_key, did)
if not t then return { 'nf' } end
redis.call('XDEL', dead_key, did)
local p = tonumber(t.p)
local eid = redis.call('XADD', streams[p + 1], '*', 'id', t.id, 'm', t.m, 'a', '0', 'x', t.x, 'j', t.j)
redis.call('HSET', jobs_key, id, '["q",' .. p .. ',"' .. eid .. '"]')
local g = group('job.queued', 'queued', now)
add(g, t.m, 0, '{"retried":true}')
emit(events_key, evmax, { g })
return { 'ok' }
