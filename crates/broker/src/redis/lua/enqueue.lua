-- KEYS: p0 p1 p2 jobs sched events queues
-- ARGV: queue now n evmax idem_ttl_ms, then 9 per job: id mode(q|s) p run_at idem_key m x j record
local queue, now, n, evmax, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
if redis.call('SADD', KEYS[7], queue) == 1 then
  for p = 1, 3 do redis.pcall('XGROUP', 'CREATE', KEYS[p], 'workers', '0', 'MKSTREAM') end
end
local out, i = {}, 6
-- One HSET for the whole batch: a call per job costs more than the field it writes.
local hset = { 'HSET', KEYS[4] }
local queued, scheduled = group('job.queued', 'queued', now), group('job.scheduled', 'scheduled', now)
for k = 1, n do
  local id, mode, p, run_at, idem, m, x, j, rec =
    ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6], ARGV[i + 7], ARGV[i + 8]
  i = i + 9
  local first = true
  if idem ~= '' then
    if not redis.call('SET', idem, id, 'NX', 'PX', ttl) then
      first = false
      out[k] = redis.call('GET', idem)
    end
  end
  if first then
    out[k] = ''
    if mode == 'q' then
      local eid = redis.call('XADD', KEYS[p + 1], '*', 'id', id, 'm', m, 'a', '0', 'x', x, 'j', j)
      hset[#hset + 1] = id
      hset[#hset + 1] = '["q",' .. p .. ',"' .. eid .. '"]'
      add(queued, m, 0)
    else
      redis.call('ZADD', KEYS[5], run_at, id)
      hset[#hset + 1] = id
      hset[#hset + 1] = rec
      add(scheduled, m, 0, '{"run_at":' .. run_at .. '}')
    end
  end
end
if #hset > 2 then redis.call(unpack(hset)) end
emit(KEYS[6], evmax, { queued, scheduled })
return out
