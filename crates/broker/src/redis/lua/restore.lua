-- KEYS: p0 p1 p2 jobs sched events queues
-- ARGV: queue evmax n, then 11 per job: id ms mode(q|s|r) p a x j m data run_at record, then the actor
--   ms: the millisecond in the id; data: the event's data; run_at and record: for s|r only (else empty)
-- Returns per job 1 (restored) or 0 (the engine knows the job: left alone).
--
-- Puts back jobs the durable record holds and Redis lost (see `Broker::restore`). A job is known when it has a
-- record in the jobs hash (every transition after the enqueue writes one) or an entry with its id in a stream:
-- the enqueue script adds it in the millisecond its id carries, so only that millisecond is read. The check and
-- the restore are one script, so a job mid-transition cannot be doubled.
local queue, evmax, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
-- Events are dated by Redis (see prelude.lua); the client's clock only chose whether a job waits again.
local now = clock_ms()
if redis.call('SADD', KEYS[7], queue) == 1 then
  for p = 1, 3 do redis.pcall('XGROUP', 'CREATE', KEYS[p], GROUP, '0', 'MKSTREAM') end
end
local function known(id, ms)
  if redis.call('HEXISTS', KEYS[4], id) == 1 then return true end
  for p = 1, 3 do
    for _, e in ipairs(redis.call('XRANGE', KEYS[p], ms .. '-0', ms .. '-18446744073709551615')) do
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
  local i = 4 + (k - 1) * 11
  local id, ms, mode, p, a, x, j, m, data, run_at, rec = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3]),
    ARGV[i + 4], ARGV[i + 5], ARGV[i + 6], ARGV[i + 7], ARGV[i + 8], ARGV[i + 9], ARGV[i + 10]
  if known(id, ms) then
    out[k] = 0
  else
    out[k] = 1
    if mode == 'q' then
      local eid = redis.call('XADD', KEYS[p + 1], '*', 'id', id, 'm', m, 'a', a, 'x', x, 'j', j)
      redis.call('HSET', KEYS[4], id, '["q",' .. p .. ',"' .. eid .. '"]')
      add(queued, m, a, data)
      add_spec(queued, j)
    else
      redis.call('ZADD', KEYS[5], run_at, id)
      redis.call('HSET', KEYS[4], id, rec)
      if mode == 's' then
        add(scheduled, m, a, data)
        add_spec(scheduled, j)
      else
        add(retrying, m, a, data)
      end
    end
  end
end
emit(KEYS[6], evmax, { queued, scheduled, retrying }, ARGV[4 + n * 11])
return out
