-- Per job: mode (q|s) p run_at idem (the idempotency key, or empty) x j a1 a2 a3, where
--   queued (q):    a1 = id tail ("7xxx-yxxx-xxxxxxxxxxxx"), a2 = the `m` object without its leading `{"job":"…"`
--   scheduled (s): a1 = id, a2 = m, a3 = the record
-- A job's submitter is its owner, which its `m` carries: the groups are marked `byo` (each event's actor is its
-- job's owner), so one call can carry many submitters' jobs (the broker coalesces concurrent single submits)
-- in two groups.
-- Returns per job: 'n', id (new) or 'd', id (an idempotency key matched an earlier job).
--
-- A queued job's id is made here: a UUIDv7 whose millisecond is the one its stream entry id carries (every
-- entry of the batch is added as "<ms>-*" with one ms, the later of the server clock and the newest entry of
-- the streams used). So the id alone tells where the entry is, and no lookup record is written at enqueue: a
-- hash insert per job cost more Redis CPU than anything else in the enqueue.
local streams = { KEYS[1], KEYS[2], KEYS[3] } -- by priority: high, normal, low
local jobs_key = KEYS[4]
local sched_key = KEYS[5]
local events_key = KEYS[6]
local queues_key = KEYS[7]
local queue = ARGV[1]
local n = tonumber(ARGV[2])
local evmax = ARGV[3]
local idem_ttl_ms = ARGV[4]
local FIRST, EACH = 5, 9 -- n jobs from ARGV[FIRST] on, EACH values apiece (see above)
local now = clock_ms()
if redis.call('SADD', queues_key, queue) == 1 then
  for p = 1, 3 do redis.pcall('XGROUP', 'CREATE', streams[p], GROUP, '0', 'MKSTREAM') end
end
local ms, prefix, seen = nil, nil, {}
for k = 1, n do
  local i = FIRST + (k - 1) * EACH
  local mode, p = unpack(ARGV, i, i + EACH - 1)
  if mode == 'q' and not seen[p] then
    seen[p] = true
    if not ms then ms = now end
    local r = redis.call('XREVRANGE', streams[tonumber(p) + 1], '+', '-', 'COUNT', 1)
    if #r > 0 then
      local last = id_parts(r[1][1])
      if last > ms then ms = last end
    end
  end
end
local msid -- the entry id pattern, formatted once
if ms then
  prefix = string.format('%08x-%04x-', math.floor(ms / 65536), ms % 65536)
  msid = tostring(ms) .. '-*'
end
local out, o = {}, 0
local hset = { 'HSET', jobs_key }
local queued, scheduled = group('job.queued', 'queued', now), group('job.scheduled', 'scheduled', now)
queued.byo, scheduled.byo = true, true
-- Queued jobs are appended to their group in place (as `add` and `add_spec` would): this loop runs for every
-- job submitted, and a Lua function call or table length costs as much as a store.
local qj, qa, qs, q = queued.jobs, queued.attempts, {}, 0
queued.specs = qs
local by_p = { ['0'] = streams[1], ['1'] = streams[2], ['2'] = streams[3] }
for k = 1, n do
  local i = FIRST + (k - 1) * EACH
  local mode, p, run_at, idem, x, j, a1, a2, a3 = unpack(ARGV, i, i + EACH - 1)
  local id
  if mode == 'q' then id = prefix .. a1 else id = a1 end
  local first = true
  if idem ~= '' then
    if not redis.call('SET', idem, id, 'NX', 'PX', idem_ttl_ms) then
      first = false
      out[o + 1] = 'd'
      out[o + 2] = redis.call('GET', idem)
      o = o + 2
    end
  end
  if first then
    out[o + 1] = 'n'
    out[o + 2] = id
    o = o + 2
    if mode == 'q' then
      local m = '{"job":"' .. id .. '"' .. a2
      redis.call('XADD', by_p[p], msid, 'id', id, 'm', m, 'a', '0', 'x', x, 'j', j)
      q = q + 1
      qj[q] = m
      qa[q] = '0'
      qs[q] = j
    else
      redis.call('ZADD', sched_key, run_at, id)
      hset[#hset + 1] = id
      hset[#hset + 1] = a3
      add(scheduled, a2, 0, '{"run_at":' .. run_at .. '}')
      add_spec(scheduled, j)
    end
  end
end
if #hset > 2 then redis.call(unpack(hset)) end
emit(events_key, evmax, { queued, scheduled })
return out
