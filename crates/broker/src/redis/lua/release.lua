-- Gives leased jobs back at the tail of their stream; the attempt is not counted (the entry's `a` is unchanged).
-- Returns the 1-based positions of the leases given back.
local streams = { KEYS[1], KEYS[2], KEYS[3] } -- by priority: high, normal, low
local jobs_key = KEYS[4]
local events_key = KEYS[5]
local n = tonumber(ARGV[1])
local evmax = ARGV[2]
local actor = ARGV[3] -- the lease holder as a JSON string
local FIRST, EACH = 4, 4 -- n leases from ARGV[FIRST] on, EACH values apiece (p eid id m)
local now = clock_ms()
local released, i = {}, FIRST
local queued = group('job.queued', 'queued', now)
for k = 1, n do
  local p, eid, id, m = unpack(ARGV, i, i + EACH - 1)
  p = tonumber(p)
  i = i + EACH
  local key = streams[p + 1]
  local t = entry(key, eid)
  if t and redis.call('XACK', key, GROUP, eid) == 1 then
    local nid = redis.call('XADD', key, '*', 'id', t.id, 'm', t.m, 'a', t.a, 'x', t.x, 'j', t.j)
    redis.call('HSET', jobs_key, id, '["q",' .. p .. ',"' .. nid .. '"]')
    add(queued, m, t.a, '{"released":true}')
    released[#released + 1] = k
  end
end
emit(events_key, evmax, { queued }, actor)
return released
