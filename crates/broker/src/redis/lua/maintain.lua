-- Trims acknowledged entries (never a pending or undelivered one: the cut is below both the oldest pending id
-- and the group's next undelivered id): without a recorder, those older than the retention, dropping the
-- completed records that point at them; with one, see the trim below. Expires cancelled records. At most
-- `batch` entries per key per call. (The dead-letter stream is capped when a job is buried.)
--
-- Before that, the jobs noted in done_key (by complete_claim.lua and cancel.lua with `drop_recorded`) whose
-- log entry lies below `recorded_below` leave: the recorder has committed their final event, so a lookup finds
-- them in the store. A completed job's record goes with its acknowledged stream entry (spec and payload), a
-- cancelled one's record with its place in fin_key. Each note is "<log entry id> c <p> <entry id> <job id> ..."
-- (completed) or "<log entry id> x <job id>" (cancelled), appended in log order (the script that wrote the
-- entry appended the note), so the first note not below the floor ends the pass. About `batch` jobs per call.
--
-- Returns { records removed, 1 when notes below the floor are left for another call }.
local streams = { KEYS[1], KEYS[2], KEYS[3] } -- by priority: high, normal, low
local jobs_key = KEYS[4]
local fin_key = KEYS[5]
local done_key = KEYS[6]
local acked_key = KEYS[7] -- streams every deletion from which was of an acknowledged entry (see stats.lua)
local retention_ms = tonumber(ARGV[1])
local batch = tonumber(ARGV[2])
local recorded_below = ARGV[3] -- the recorder group's floor on this shard's event log, or '' (no recorder)
-- Redis's clock, as the stream entry ids it is compared with are.
local now = clock_ms()
local removed = 0
-- Deleting an acknowledged entry keeps Redis's group lag right (unlike deleting an undelivered one), so a
-- stream nothing was ever deleted from is marked before its first such deletion; cancel.lua unmarks it.
local marked = {}
local function xdel_acked(p, eids)
  local key = streams[p + 1]
  if marked[p] == nil then
    marked[p] = redis.call('HEXISTS', acked_key, p) == 1
    if not marked[p] and redis.call('EXISTS', key) == 1 then
      local info = redis.call('XINFO', 'STREAM', key)
      for k = 1, #info, 2 do
        if info[k] == 'max-deleted-entry-id' and info[k + 1] == '0-0' then
          redis.call('HSET', acked_key, p, '1')
          marked[p] = true
        end
      end
    end
  end
  redis.call('XDEL', key, unpack(eids))
end
-- A note older than the retention is only taken off: the passes below handle its jobs as any other's (this
-- bounds the list when no recorder reads the log).
local expired = tostring(math.max(now - retention_ms, 0)) .. '-0'
local function ripe(note)
  local sid = string.match(note, '^%S+')
  if recorded_below ~= '' and id_lt(sid, recorded_below) then return 'recorded' end
  if id_lt(sid, expired) then return 'expired' end
  return nil
end
local more, handled = 0, 0
while handled < batch do
  local note = redis.call('LINDEX', done_key, 0)
  if not note then break end
  local why = ripe(note)
  if not why then break end
  handled = handled + 1
  if why == 'recorded' then
    local t, k = {}, 0
    for f in string.gmatch(note, '%S+') do
      k = k + 1
      t[k] = f
    end
    if t[2] == 'c' then
      -- Completed: "sid c p eid id ...". The records are final, so they go without being read.
      local eids, ids = { {}, {}, {} }, {}
      for j = 3, k - 2, 3 do
        local by = eids[tonumber(t[j]) + 1]
        by[#by + 1] = t[j + 1]
        ids[#ids + 1] = t[j + 2]
      end
      for p = 0, 2 do
        if #eids[p + 1] > 0 then xdel_acked(p, eids[p + 1]) end
      end
      removed = removed + redis.call('HDEL', jobs_key, unpack(ids))
      handled = handled + #ids
    elseif t[2] == 'x' then
      -- Cancelled: "sid x id".
      removed = removed + redis.call('HDEL', jobs_key, t[3])
      redis.call('ZREM', fin_key, t[3])
      handled = handled + 1
    end
  end
  redis.call('LPOP', done_key)
end
local next_note = redis.call('LINDEX', done_key, 0)
if next_note and ripe(next_note) then more = 1 end
-- The trim. With a recorder, the cut does not wait for the retention: below the oldest pending and the next
-- undelivered entry, an entry is either a completed job's whose completion is not recorded yet (its record
-- points at it, and lookups read its spec: the cut stops there until the notes above take it), or one nothing
-- reads any more (an earlier attempt of a retried job, a dead or cancelled job's, whose record holds its own
-- copy of the spec). Without one, only entries older than the retention go, with their completed records.
-- The trim and the expiry run once per pass, in its last call (when no note is left).
if more == 1 then return { removed, more } end
-- Entries below the cut are walked a few at a time with a recorder: the first one left is usually a
-- completion not recorded yet, where the walk stops, so reading many would be wasted.
local step = batch
if recorded_below ~= '' then step = 32 end
for p = 1, 3 do
  local key = streams[p]
  if redis.call('EXISTS', key) == 1 then
    local g = cgroup(key)
    if g then
      local minid = expired
      local undelivered = id_next(g['last-delivered-id'])
      if recorded_below ~= '' or id_lt(undelivered, minid) then minid = undelivered end
      if g.pending > 0 then
        local oldest = redis.call('XPENDING', key, GROUP)[2]
        if id_lt(oldest, minid) then minid = oldest end
      end
      local cut, from, seen, stopped = minid, '-', 0, false
      while not stopped and seen < batch do
        local chunk = redis.call('XRANGE', key, from, '(' .. minid, 'COUNT', step)
        for _, e in ipairs(chunk) do
          local id = e[2][2]
          local rec = redis.call('HGET', jobs_key, id)
          if rec and state_of(rec) == 'c' and string.find(rec, '"' .. e[1] .. '"', 1, true) then
            if not id_lt(e[1], expired) then
              cut, stopped = e[1], true
              break
            end
            redis.call('HDEL', jobs_key, id)
            removed = removed + 1
          end
        end
        seen = seen + #chunk
        if stopped or #chunk < step then break end
        from = '(' .. chunk[#chunk][1]
        if seen >= batch then cut = id_next(chunk[#chunk][1]) end
      end
      if seen > 0 then redis.call('XTRIM', key, 'MINID', cut) end
    end
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', fin_key, '-inf', now - retention_ms, 'LIMIT', 0, batch)) do
  local rec = redis.call('HGET', jobs_key, id)
  if rec and state_of(rec) == 'x' then
    redis.call('HDEL', jobs_key, id)
    removed = removed + 1
  end
  redis.call('ZREM', fin_key, id)
end
return { removed, more }
