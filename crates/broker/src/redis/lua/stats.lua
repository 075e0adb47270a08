-- Returns {depth, active, lag_ms, scheduled, dead, paused, delivered}. No ARGV: lag is measured by Redis's clock,
-- the one stream ids carry.
--
-- Depth is the number of entries after the group's last-delivered-id. The group's `lag` says so exactly only
-- while no entry of the stream was ever deleted: a cancelled queued job is deleted (XDEL) before any worker
-- reads it, and Redis 7.0 then miscounts. Its XREADGROUP does not notice the deleted entry it skips, so the
-- lag stays one too high per such job, for good: a drained queue showed jobs that do not exist (later Redis
-- versions fixed this, and answer no lag while a deletion lies ahead). So, cheapest first: nothing after
-- last-delivered-id is 0; everything after it (the first entry is newer) is the stream's length; a stream
-- never deleted from (`max-deleted-entry-id` 0-0) takes the lag, and so does one whose deletions were all of
-- acknowledged entries (maintain.lua drops recorded jobs' entries: those lie behind the group, which never
-- skips them); any other is counted.
--
-- The count stops at COUNT_MAX entries, since XRANGE hands each entry (spec and payload) to the script, and a
-- stats call (every few seconds per queue from each worker, the autoscaler, the API) must stay cheap next to
-- the job cycle. Below the bound, which is where a phantom job misleads (an autoscaler waking a queue scaled
-- to zero, a drained queue that never looks drained), the depth is exact. Above it the depth is the larger of
-- the count and Redis's own figure (the lag, or entries added minus entries read when Redis gives no lag):
-- never below the bound, and on Redis 7.0 possibly too high by the jobs cancelled while queued. Only where
-- Redis has no figure at all (a deletion ahead of a group whose read counter it lost) does the count go on,
-- up to FAR_MAX as it always did: a figure stuck at COUNT_MAX would hide a large backlog from the autoscaler.
local streams = { KEYS[1], KEYS[2], KEYS[3] } -- by priority: high, normal, low
local sched_key = KEYS[4]
local dead_key = KEYS[5]
local paused_key = KEYS[6]
local acked_key = KEYS[7] -- streams every deletion from which was of an acknowledged entry (maintain.lua)
local COUNT_MAX, FAR_MAX = 1000, 100000

local function fields(t)
  local r = {}
  for i = 1, #t, 2 do r[t[i]] = t[i + 1] end
  return r
end

-- Entries of stream `key` after last-delivered-id, for group info `g`.
local function waiting(key, g, acked_only)
  local s = fields(redis.call('XINFO', 'STREAM', key))
  local last = g['last-delivered-id']
  if s.length == 0 or not id_lt(last, s['last-generated-id']) then return 0 end
  if s['first-entry'] and id_lt(last, s['first-entry'][1]) then return s.length end
  if (acked_only or s['max-deleted-entry-id'] == '0-0') and g.lag then return g.lag end
  local from = '(' .. last
  local n = #redis.call('XRANGE', key, from, '+', 'COUNT', COUNT_MAX)
  if n < COUNT_MAX then return n end
  local figure = g.lag
  if not figure and g['entries-read'] then figure = s['entries-added'] - g['entries-read'] end
  if figure then return math.max(n, figure) end
  return #redis.call('XRANGE', key, from, '+', 'COUNT', FAR_MAX)
end

local now = clock_ms()
local depth, active, oldest, delivered = 0, 0, nil, 0
for p = 1, 3 do
  local key = streams[p]
  if redis.call('EXISTS', key) == 1 then
    local g = cgroup(key)
    local from = '-'
    if g then
      active = active + g.pending
      -- entries-read: entries delivered to the group so far (Redis 7); nil while Redis cannot tell.
      if g['entries-read'] then delivered = delivered + g['entries-read'] end
      from = '(' .. g['last-delivered-id']
      depth = depth + waiting(key, g, redis.call('HEXISTS', acked_key, p - 1) == 1)
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
if redis.call('EXISTS', dead_key) == 1 then dead = redis.call('XLEN', dead_key) end
return { depth, active, lag_ms, redis.call('ZCARD', sched_key), dead, redis.call('EXISTS', paused_key), delivered }
