-- KEYS: p0 p1 p2 jobs dead events
-- ARGV: id evmax
local id, evmax, now = ARGV[1], ARGV[2], clock_ms()
local rec = redis.call('HGET', KEYS[4], id)
if not rec then return { 'nf' } end
if state_of(rec) ~= 'd' then return { 'nd', state_of(rec) } end
local did = string.match(rec, '^%["d",%d+,%d+,"([^"]+)"')
local t = entry(KEYS[5], did)
if not t then return { 'nf' } end
redis.call('XDEL', KEYS[5], did)
local p = tonumber(t.p)
local eid = redis.call('XADD', KEYS[p + 1], '*', 'id', t.id, 'm', t.m, 'a', '0', 'x', t.x, 'j', t.j)
redis.call('HSET', KEYS[4], id, '["q",' .. p .. ',"' .. eid .. '"]')
local g = group('job.queued', 'queued', now)
add(g, t.m, 0, '{"retried":true}')
emit(KEYS[6], evmax, { g })
return { 'ok' }
