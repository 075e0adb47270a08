-- KEYS: p0 p1 p2 sched dead paused
-- ARGV: now
-- Returns {depth, active, lag_ms, scheduled, dead, paused, delivered}.
local now = tonumber(ARGV[1])
local depth, active, oldest, delivered = 0, 0, nil, 0
for p = 1, 3 do
  local key = KEYS[p]
  if redis.call('EXISTS', key) == 1 then
    local g = cgroup(key)
    local from = '-'
    if g then
      active = active + g.pending
      -- entries-read: entries delivered to the group so far (Redis 7); nil while Redis cannot tell.
      if g['entries-read'] then delivered = delivered + g['entries-read'] end
      from = '(' .. g['last-delivered-id']
      local lag = g.lag
      if not lag then
        -- Redis cannot tell the lag while deleted entries (cancelled jobs) lie ahead of the group: count.
        lag = #redis.call('XRANGE', key, from, '+', 'COUNT', 100000)
      end
      depth = depth + lag
    else
      depth = depth + redis.call('XLEN', key)
    end
    local first = redis.call('XRANGE', key, from, '+', 'COUNT', 1)
    if #first > 0 then
      local ms = id_parts(first[1][1])
      if not oldest or ms < oldest then oldest = ms end
    end
  end
end
local lag_ms = 0
if oldest and now > oldest then lag_ms = now - oldest end
local dead = 0
if redis.call('EXISTS', KEYS[5]) == 1 then dead = redis.call('XLEN', KEYS[5]) end
return { depth, active, lag_ms, redis.call('ZCARD', KEYS[4]), dead, redis.call('EXISTS', KEYS[6]), delivered }
