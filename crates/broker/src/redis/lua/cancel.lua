-- KEYS: p0 p1 p2 jobs sched fin events
-- ARGV: id evmax p eid by  (p and eid: where the caller found a job that has no record yet, or empty; by:
-- the actor as a JSON string, or empty)
-- Returns {'nf'}, {'final', state_letter} or {'ok', previous_state}.
local id, evmax, now = ARGV[1], ARGV[2], clock_ms()
local rec = redis.call('HGET', KEYS[4], id)
if not rec then
  -- Still in the entry it was enqueued as (no transition has written a record yet).
  if ARGV[4] == nil or ARGV[4] == '' then return { 'nf' } end
  rec = '["q",' .. ARGV[3] .. ',"' .. ARGV[4] .. '"]'
end
local st = state_of(rec)
local prev, att, pk, m
if st == 'q' then
  local p, eid = parse_q(rec)
  local key = KEYS[p + 1]
  local t = entry(key, eid)
  if not t or t.id ~= id then return { 'nf' } end
  if pending(key, eid) then
    -- Active: acknowledging revokes the lease (heartbeat and completion of the holder now fail).
    redis.call('XACK', key, GROUP, eid)
    prev, att = 'active', tonumber(t.a) + 1
  else
    -- Queued: delete the undelivered entry so no worker ever claims it.
    redis.call('XDEL', key, eid)
    prev, att = 'queued', tonumber(t.a)
  end
  pk, m = pack(t, p), t.m
elseif st == 's' or st == 'r' then
  local r = cjson.decode(rec)
  redis.call('ZREM', KEYS[5], id)
  prev = (st == 's') and 'scheduled' or 'retrying'
  pk = r[4]
  att = cjson.decode(pk).a
  m = cjson.decode(pk).m
else
  return { 'final', st }
end
redis.call('HSET', KEYS[4], id, '["x",' .. now .. ',' .. att .. ',' .. cjson.encode(pk) .. ']')
redis.call('ZADD', KEYS[6], now, id)
local g = group('job.cancelled', 'cancelled', now)
add(g, m, att)
emit(KEYS[7], evmax, { g }, ARGV[5])
return { 'ok', prev }
