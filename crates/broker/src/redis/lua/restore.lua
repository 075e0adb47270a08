-- Per job: id ms mode (q|s|r) p a x j m data run_at rec, where ms is the millisecond in the id, data the event's
-- data, run_at and rec (the record) for s|r only (else empty).
-- Returns per job 1 (restored) or 0 (the engine knows the job: left alone).
--
-- Puts back jobs the durable record holds and Redis lost (see `Broker::restore`). A job is known when it has a
-- record in the jobs hash (every transition after the enqueue writes one) or an entry with its id in a stream:
-- the enqueue script adds it in the millisecond its id carries, so only that millisecond is read. The check and
-- the restore are one script, so a job mid-transition cannot be doubled.
local streams = { KEYS[1], KEYS[2], KEYS[3] } -- by priority: high, normal, low
local jobs_key = KEYS[4]
local sched_key = KEYS[5]
local events_key = KEYS[6]
local queues_key = KEYS[7]
local queue = ARGV[1]
local evmax = ARGV[2]
local n = tonumber(ARGV[3])
local actor = ARGV[4] -- the restorer as a JSON string
local FIRST, EACH = 5, 11 -- n jobs from ARGV[FIRST] on, EACH values apiece (see above)
-- Events are dated by Redis (see prelude.lua); the client's clock only chose whether a job waits again.
local now = clock_ms()
if redis.call('SADD', queues_key, queue) == 1 then
  for p = 1, 3 do redis.pcall('XGROUP', 'CREATE', streams[p], GROUP, '0', 'MKSTREAM') end
end
local function known(id, ms)
  if redis.call('HEXISTS', jobs_key, id) == 1 then return true end
  for p = 1, 3 do
    for _, e in ipairs(redis.call('XRANGE', streams[p], ms .. '-0', ms .. '-18446744073709551615')) do
      if e[2][2] == id then return true end
    end
  end
  return false
end
local out = {}
local queued = group('job.queued', 'queued', now)
local scheduled = group('job.scheduled', 'scheduled', now)
local retrying = group('job.retrying', 'retrying', now)
for k = 1, n do
  local i = FIRST + (k - 1) * EACH
  local id, ms, mode, p, a, x, j, m, data, run_at, rec = unpack(ARGV, i, i + EACH - 1)
  p = tonumber(p)
  if known(id, ms) then
    out[k] = 0
  else
    out[k] = 1
    if mode == 'q' then
      local eid = redis.call('XADD', streams[p + 1], '*', 'id', id, 'm', m, 'a', a, 'x', x, 'j', j)
      redis.call('HSET', jobs_key, id, '["q",' .. p .. ',"' .. eid .. '"]')
      add(queued, m, a, data)
      add_spec(queued, j)
    else
      redis.call('ZADD', sched_key, run_at, id)
      redis.call('HSET', jobs_key, id, rec)
      if mode == 's' then
        add(scheduled, m, a, data)
        add_spec(scheduled, j)
      else
        add(retrying, m, a, data)
      end
    end
  end
end
emit(events_key, evmax, { queued, scheduled, retrying }, actor)
return out
