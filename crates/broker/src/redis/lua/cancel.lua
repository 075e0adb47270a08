-- Returns {'nf'}, {'final', state_letter} or {'ok', previous_state}.
local streams = { KEYS[1], KEYS[2], KEYS[3] } -- by priority: high, normal, low
local jobs_key = KEYS[4]
local sched_key = KEYS[5]
local fin_key = KEYS[6]
local events_key = KEYS[7]
local done_key = KEYS[8]
local acked_key = KEYS[9] -- streams every deletion from which was of an acknowledged entry (see stats.lua)
local id = ARGV[1]
local evmax = ARGV[2]
local hint_p = ARGV[3] -- hint_p and hint_eid: where the caller found a job that has no record yet, or empty
local hint_eid = ARGV[4]
local by = ARGV[5] -- the actor as a JSON string, or empty
local drop_recorded = ARGV[6] -- '1': note the job in done_key, to leave once recorded (maintain.lua)
local now = clock_ms()
local rec = redis.call('HGET', jobs_key, id)
if not rec then
  -- Still in the entry it was enqueued as (no transition has written a record yet).
  if hint_eid == nil or hint_eid == '' then return { 'nf' } end
  rec = '["q",' .. hint_p .. ',"' .. hint_eid .. '"]'
end
local st = state_of(rec)
local prev, att, pk, m
if st == 'q' then
  local p, eid = parse_q(rec)
  local key = streams[p + 1]
  local t = entry(key, eid)
  if not t or t.id ~= id then return { 'nf' } end
  if pending(key, eid) then
    -- Active: acknowledging revokes the lease (heartbeat and completion of the holder now fail).
    redis.call('XACK', key, GROUP, eid)
    prev, att = 'active', tonumber(t.a) + 1
  else
    -- Queued: delete the undelivered entry so no worker ever claims it. Redis 7.0's group lag miscounts from
    -- then on (stats.lua).
    redis.call('HDEL', acked_key, tostring(p))
    redis.call('XDEL', key, eid)
    prev, att = 'queued', tonumber(t.a)
  end
  pk, m = pack(t, p), t.m
elseif st == 's' or st == 'r' then
  local r = cjson.decode(rec)
  redis.call('ZREM', sched_key, id)
  prev = (st == 's') and 'scheduled' or 'retrying'
  pk = r[4]
  att = cjson.decode(pk).a
  m = cjson.decode(pk).m
else
  return { 'final', st }
end
redis.call('HSET', jobs_key, id, '["x",' .. now .. ',' .. att .. ',' .. cjson.encode(pk) .. ']')
redis.call('ZADD', fin_key, now, id)
local g = group('job.cancelled', 'cancelled', now)
add(g, m, att)
local sid = emit(events_key, evmax, { g }, by)
if drop_recorded == '1' then redis.call('RPUSH', done_key, sid .. ' x ' .. id) end
return { 'ok', prev }
