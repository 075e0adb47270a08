-- A worker's settling call: complete `n` leased jobs, then lease up to `max` more of the same queue for
-- `consumer`, with one entry in the event log for both. `claim` is this script with no completions, `complete`
-- it with `max` 0, and a worker whose completions free slots sends both in one call.
--
-- Completing: XACK's reply is the fence: 1 only while the entry is still pending. An entry leaves the pending
-- list only through a script that acknowledges it atomically (reclaim, release, cancel, complete, fail), so
-- "still pending" means "this lease is still current". The batch's records go in one HSET.
--
-- Claiming is XREADGROUP: the pending entry (owner + delivery) is the lease, so no per-job write here (one per
-- call: the claim key below). claim_key is this call's own key (a token the caller draws per call): the leases
-- taken are noted there for claim_ttl_ms, so that if the caller gives up on the call (its reply timed out or
-- never came) abandon.lua can hand them back uncharged; a call that arrives after abandon.lua marked the key
-- leases nothing (its completions still count: they are fenced by their own leases). With `max` 0 the claim
-- key, like the pause flag, is not touched. The leases are noted as ranges, "p|first|last" per stream read:
-- XREADGROUP '>' hands out the entries that follow the group's last delivered id in order, so every entry
-- between the first and the last it returned was leased by this call (entries are never added below a
-- stream's last id).
--
-- With `drop_recorded`, the completed jobs are noted for maintain.lua, which drops them once the recorder has
-- committed this call's log entry: one RPUSH per call of "<log entry id> c <p> <entry id> <job id> ...", with
-- each job's stream and entry, so that the drop needs no lookup.
--
-- Returns { rejected, claimed }: the 1-based positions of the rejected completions, and {'none'} (max 0),
-- {'abandoned'}, {'paused'}, {'empty'} (after completions) or {'empty', last0, last1, last2} (ids to block on),
-- or {'jobs', p, eid, id, a, j, ...} (the caller rebuilds `m` from the spec: returning it would cost Redis more
-- than it saves the caller).
local streams = { KEYS[1], KEYS[2], KEYS[3] } -- by priority: high, normal, low
local jobs_key = KEYS[4]
local paused_key = KEYS[5]
local events_key = KEYS[6]
local claim_key = KEYS[7]
local done_key = KEYS[8]
local n = tonumber(ARGV[1])
local evmax = ARGV[2]
local actor = ARGV[3] -- the lease holder as a JSON string
local consumer = ARGV[4]
local max = tonumber(ARGV[5])
local claim_ttl_ms = ARGV[6]
local drop_recorded = ARGV[7] -- '1': note the completed jobs in done_key, to leave once recorded (maintain.lua)
local FIRST, EACH = 8, 6 -- n jobs from ARGV[FIRST] on, EACH values apiece (p eid id att m result)
local now = clock_ms()
-- The streams by `p` as the caller sends it.
local by_p = { ['0'] = streams[1], ['1'] = streams[2], ['2'] = streams[3] }
local completed, active = group('job.completed', 'completed', now), group('job.active', 'active', now)

-- Per job, the groups' lists are appended to in place (as `add` would): these loops run for every job a worker
-- settles or takes, and a Lua function call or table length costs as much as a store.
local rejected = {}
local c = 0
-- With drop_recorded: "p eid id" of each job completed, in pieces.
local noted = (drop_recorded == '1') and {} or nil
if n > 0 then
  local hset, h = { 'HSET', jobs_key }, 2
  local at = ms_text(now)
  local cj, ca, cd = completed.jobs, completed.attempts, {}
  completed.data = cd
  local i = FIRST
  for k = 1, n do
    local p, eid, id, att, m, result = unpack(ARGV, i, i + EACH - 1)
    i = i + EACH
    if redis.call('XACK', by_p[p], GROUP, eid) == 1 then
      hset[h + 1] = id
      hset[h + 2] = '["c",' .. at .. ',' .. att .. ',' .. p .. ',"' .. eid .. '",' .. result .. ']'
      h = h + 2
      c = c + 1
      cj[c] = m
      ca[c] = att
      cd[c] = result
      if noted then
        local o = #noted
        noted[o + 1] = p
        noted[o + 2] = eid
        noted[o + 3] = id
      end
    else
      rejected[#rejected + 1] = k
    end
  end
  if h > 2 then redis.call(unpack(hset)) end
end

local function claim()
  if max <= 0 then return { 'none' } end
  if redis.call('EXISTS', claim_key) == 1 then return { 'abandoned' } end
  if redis.call('EXISTS', paused_key) == 1 then return { 'paused' } end
  -- `taken` holds the leased ranges as pieces of one string ("p|first|last ..."), joined once for the claim key.
  local remaining, taken, out, next_attempt = max, {}, { 'jobs' }, {}
  local o, aj, aa, a_n = 1, active.jobs, active.attempts, 0
  for p = 0, 2 do
    if remaining <= 0 then break end
    local key, ptext = streams[p + 1], tostring(p)
    local res = redis.pcall('XREADGROUP', 'GROUP', GROUP, consumer, 'COUNT', remaining, 'STREAMS', key, '>')
    if type(res) == 'table' and res.err then
      -- The group does not exist yet (stream created by a promote or retry before any enqueue registered it).
      redis.call('XGROUP', 'CREATE', key, GROUP, '0', 'MKSTREAM')
      res = redis.call('XREADGROUP', 'GROUP', GROUP, consumer, 'COUNT', remaining, 'STREAMS', key, '>')
    end
    if res then
      local entries = res[1][2]
      for e = 1, #entries do
        local eid, f = entries[e][1], entries[e][2]
        -- fields in write order: id m a x j
        local id, m, a, j = f[2], f[4], f[6], f[10]
        out[o + 1] = p
        out[o + 2] = eid
        out[o + 3] = id
        out[o + 4] = a
        out[o + 5] = j
        o = o + 5
        -- The attempt as text, formatted once per distinct value.
        local an = next_attempt[a]
        if not an then
          an = tostring(tonumber(a) + 1)
          next_attempt[a] = an
        end
        a_n = a_n + 1
        aj[a_n] = m
        aa[a_n] = an
      end
      if #entries > 0 then
        local t = #taken
        taken[t + 1] = ptext
        taken[t + 2] = '|'
        taken[t + 3] = entries[1][1]
        taken[t + 4] = '|'
        taken[t + 5] = entries[#entries][1]
        taken[t + 6] = ' '
      end
      remaining = remaining - #entries
    end
  end
  if #taken == 0 then
    -- Only a call that may wait (no completions) needs to know what to wait after.
    if n > 0 then return { 'empty' } end
    local last = { 'empty' }
    for p = 1, 3 do
      local r = redis.call('XREVRANGE', streams[p], '+', '-', 'COUNT', 1)
      last[#last + 1] = (#r > 0) and r[1][1] or '0-0'
    end
    return last
  end
  taken[#taken] = nil -- the last separator
  redis.call('SET', claim_key, table.concat(taken), 'PX', claim_ttl_ms)
  return out
end

local claimed = claim()
local sid = emit(events_key, evmax, { completed, active }, actor)
if c > 0 and noted then redis.call('RPUSH', done_key, sid .. ' c ' .. table.concat(noted, ' ')) end
return { rejected, claimed }
