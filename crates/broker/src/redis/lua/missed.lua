-- How far a channel's history reaches back (no prelude).
-- Returns {epoch, now_ms, stream exists (0/1), floor}: the history reaches back to a position iff it is at or
-- above the floor. The entries themselves are read by an XRANGE sent just before this script, outside Lua
-- (converting a long reply to Lua tables and back costs Redis ten times the XRANGE itself); anything trimmed in
-- between raises the floor, so the answer errs on the safe side. Trimming (MAXLEN, MINID) removes the oldest entries and does not move
-- max-deleted-entry-id (only XDEL does), so the floor is the highest of: max-deleted-entry-id; the first entry
-- held, when any entry was ever removed (entries-added above the length); the last id ever generated, when
-- every entry was removed.
local stream_key = KEYS[1] -- the history stream (an application channel's, or the shard's ferry:events)
local epoch_key = KEYS[2] -- the shard's epoch key, ferry:epoch
local fresh_epoch = ARGV[1] -- an epoch to set when the shard has none
local epoch = redis.call('GET', epoch_key)
if not epoch then
  epoch = fresh_epoch
  redis.call('SET', epoch_key, epoch)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', stream_key) == 0 then
  return { epoch, now, 0, '0-0' }
end
local info = redis.call('XINFO', 'STREAM', stream_key)
local f = {}
for i = 1, #info, 2 do f[info[i]] = info[i + 1] end
local floor = f['max-deleted-entry-id']
local function above(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end
if tonumber(f['entries-added']) > tonumber(f['length']) then
  local first = f['last-generated-id']
  if f['first-entry'] then first = f['first-entry'][1] end
  if above(first, floor) then floor = first end
end
return { epoch, now, 1, floor }
