-- KEYS: p0 p1 p2 jobs sched events queues
-- ARGV: queue n evmax idem_ttl_ms, then 9 per job: mode(q|s) p run_at idem_key x j a1 a2 a3, then the actor
--   queued (q):    a1 = id tail ("7xxx-yxxx-xxxxxxxxxxxx"), a2 = the `m` object without its leading `{"job":"…"`
--   scheduled (s): a1 = id, a2 = m, a3 = the record
-- Returns per job: 'n', id (new) or 'd', id (an idempotency key matched an earlier job).
--
-- A queued job's id is made here: a UUIDv7 whose millisecond is the one its stream entry id carries (every
-- entry of the batch is added as "<ms>-*" with one ms, the later of the server clock and the newest entry of
-- the streams used). So the id alone tells where the entry is, and no lookup record is written at enqueue: a
-- hash insert per job cost more Redis CPU than anything else in the enqueue.
local queue, n, evmax, ttl, now = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], clock_ms()
if redis.call('SADD', KEYS[7], queue) == 1 then
  for p = 1, 3 do redis.pcall('XGROUP', 'CREATE', KEYS[p], GROUP, '0', 'MKSTREAM') end
end
local ms, prefix, seen = nil, nil, {}
for k = 1, n do
  local i = 5 + (k - 1) * 9
  local p = ARGV[i + 1]
  if ARGV[i] == 'q' and not seen[p] then
    seen[p] = true
    if not ms then ms = now end
    local r = redis.call('XREVRANGE', KEYS[tonumber(p) + 1], '+', '-', 'COUNT', 1)
    if #r > 0 then
      local last = id_parts(r[1][1])
      if last > ms then ms = last end
    end
  end
end
if ms then prefix = string.format('%08x-%04x-', math.floor(ms / 65536), ms % 65536) end
local out = {}
local hset = { 'HSET', KEYS[4] }
local queued, scheduled = group('job.queued', 'queued', now), group('job.scheduled', 'scheduled', now)
for k = 1, n do
  local i = 5 + (k - 1) * 9
  local mode, p, run_at, idem, x, j = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  local id
  if mode == 'q' then id = prefix .. ARGV[i + 6] else id = ARGV[i + 6] end
  local first = true
  if idem ~= '' then
    if not redis.call('SET', idem, id, 'NX', 'PX', ttl) then
      first = false
      out[#out + 1] = 'd'
      out[#out + 1] = redis.call('GET', idem)
    end
  end
  if first then
    out[#out + 1] = 'n'
    out[#out + 1] = id
    if mode == 'q' then
      local m = '{"job":"' .. id .. '"' .. ARGV[i + 7]
      redis.call('XADD', KEYS[p + 1], ms .. '-*', 'id', id, 'm', m, 'a', '0', 'x', x, 'j', j)
      add(queued, m, 0)
      add_spec(queued, j)
    else
      redis.call('ZADD', KEYS[5], run_at, id)
      hset[#hset + 1] = id
      hset[#hset + 1] = ARGV[i + 8]
      add(scheduled, ARGV[i + 7], 0, '{"run_at":' .. run_at .. '}')
      add_spec(scheduled, j)
    end
  end
end
if #hset > 2 then redis.call(unpack(hset)) end
emit(KEYS[6], evmax, { queued, scheduled }, ARGV[5 + n * 9])
return out
