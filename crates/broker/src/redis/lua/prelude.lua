-- Shared helpers, prepended to every script.
-- GROUP, the consumer group every worker joins, is not spelled here: the loader (scripts.rs) puts
-- `local GROUP = '<keys::GROUP>'` before this prelude, so the Rust constant is the only place the name is written.
-- Job stream entries have five fields in a fixed order: id, m (pre-rendered JSON object with job, pt, queue, kind,
-- owner, tenant), a (attempts made before this entry), x (max attempts), j (the job spec as JSON).
-- Records in the jobs hash are JSON arrays whose first element is the state letter:
--   ["q",P,"EID"]                        queued or active (active = the entry is pending in the group)
--   ["s"|"r",RUN_AT,ATTEMPTS,PACK,ERR]   scheduled / retrying; PACK is a JSON string of the entry fields + p
--   ["c",AT,ATTEMPTS,P,"EID",RESULT]     completed; the spec stays in the (acknowledged) stream entry
--   ["x",AT,ATTEMPTS,PACK]               cancelled
--   ["d",AT,ATTEMPTS,"DEAD_EID",ERR]     dead; the spec is in the dead-letter stream entry
-- Events of a batch are grouped by type, and each group is written as
--   {"type":T,"state":S,"at":MS,"jobs":[M,...],"attempts":[N,...],"data":[D,...]}
-- where M is the job's `m` field (a JSON object with job, pt, queue, kind, owner, tenant; pt, the partition of
-- the owner, is absent from jobs enqueued by an older ferry) taken as is: per job, the scripts only append
-- strings they already hold (and match its pt once), which is what keeps events cheap in Redis CPU.
-- The time of this call by Redis's clock, in ms. Scripts never take "now" from the client: a request held up on
-- the way (a partition, a stalled connection, a paused server) would date its events, and compare its deadlines,
-- by when it was sent rather than when it took effect, and clients' clocks disagree. TIME may precede writes
-- because Redis 7 replicates scripts by their effects. Only times that are the client's to choose (a job's run-at,
-- its created_at) still come from the client.
-- The same instant as text is kept beside it (NOW_MS, NOW_TEXT): Lua formats a 13-digit number with sprintf at
-- about 2 µs, more than the whole TIME call, so the text is made from TIME's own digits instead.
local NOW_MS, NOW_TEXT
local function clock_ms()
  local t = redis.call('TIME')
  local us = t[2]
  NOW_MS = tonumber(t[1]) * 1000 + math.floor(tonumber(us) / 1000)
  NOW_TEXT = t[1] .. string.sub(string.rep('0', 6 - #us) .. us, 1, 3)
  return NOW_MS
end

-- A time in ms as text: the clock's own text when it is the clock's reading.
local function ms_text(ms)
  if ms == NOW_MS then return NOW_TEXT end
  return tostring(ms)
end

-- `at` is kept as text: Lua turns a number into a string with sprintf, which costs more than anything else a
-- group does per output, so each number is formatted once per call (see also `num`).
local function group(ty, state, now)
  return { ty = ty, state = state, at = ms_text(now), jobs = {}, attempts = {}, data = nil }
end

-- Small numbers (attempts) as text, each formatted once per call.
local NUMS = {}
local function num(n)
  local s = NUMS[n]
  if not s then
    s = tostring(n)
    NUMS[n] = s
  end
  return s
end

-- `spec` (the job spec JSON) goes to the durable stream only.
local function add_spec(g, spec)
  g.specs = g.specs or {}
  g.specs[#g.jobs] = spec
end

-- `attempt` is text, or a number (formatted here, once per distinct value).
local function add(g, m, attempt, data)
  local n = #g.jobs + 1
  g.jobs[n] = m
  if type(attempt) == 'number' then attempt = num(attempt) end
  g.attempts[n] = attempt
  if data then
    g.data = g.data or {}
    g.data[n] = data
  end
end

-- Append `list` to the pieces `out`, with `sep` (if any) between items.
local function join(out, list, sep)
  local o = #out
  for k = 1, #list do
    if sep and k > 1 then
      o = o + 1
      out[o] = sep
    end
    o = o + 1
    out[o] = list[k]
  end
end

-- Append the items of `list` at the positions `ks` to the pieces `out`, `sep` between them.
local function pick(out, list, ks, sep)
  local o = #out
  for x = 1, #ks do
    if x > 1 then
      o = o + 1
      out[o] = sep
    end
    o = o + 1
    out[o] = list[ks[x]]
  end
end

-- One group as published, without its closing brace, appended to the pieces `out`: all its jobs, or (`ks`)
-- only those at the positions ks, which also says where they stand among all the call's events ("n", 0-based
-- across groups in order, `base` being the events before this group): event ids are `<sid>/<position>` whatever
-- channel carried them.
-- Everything an event carries is appended as pieces and joined once per message: Redis's Lua hashes every byte
-- of every string it makes, so each intermediate string (a group's head, the groups joined) would cost the
-- whole message again.
local function head(out, g, by, ks, base)
  local o = #out
  out[o + 1] = '{"type":"'
  out[o + 2] = g.ty
  out[o + 3] = '","state":"'
  out[o + 4] = g.state
  out[o + 5] = '","at":'
  out[o + 6] = g.at
  out[o + 7] = ',"jobs":['
  if ks then pick(out, g.jobs, ks, ',') else join(out, g.jobs, ',') end
  out[#out + 1] = '],"attempts":['
  if ks then pick(out, g.attempts, ks, ',') else join(out, g.attempts, ',') end
  out[#out + 1] = ']'
  if g.data then
    out[#out + 1] = ',"data":['
    if ks then pick(out, g.data, ks, ',') else join(out, g.data, ',') end
    out[#out + 1] = ']'
  end
  if by and by ~= '' then
    out[#out + 1] = ',"by":'
    out[#out + 1] = by
  end
  if g.byo then out[#out + 1] = ',"byo":true' end
  if ks then
    out[#out + 1] = ',"n":['
    for x = 1, #ks do
      if x > 1 then out[#out + 1] = ',' end
      out[#out + 1] = base + ks[x] - 1
    end
    out[#out + 1] = ']'
  end
end

-- The partition of `m` as text ('' when m has none), and where the id's closing quote is.
-- m is {"job":"<id>","pt":N,... (or {"job":"<id>","queue":... from an older ferry): find the id's closing
-- quote, look at one byte, read the digits; cheaper than one pattern over the prefix.
local function partition(m)
  local e = string.find(m, '"', 9, true)
  if e and string.byte(m, e + 3) == 112 then return string.match(m, '^%d+', e + 7) or '', e end
  return '', e
end

-- Append the non-empty groups as ONE entry of the durable per-shard stream, then publish them, without the
-- specs (those are for the recorder, which reads the stream), as {"sid":SID,"events":[groups]}:
--   * on 'ferry:ev:p:<N>' per partition N of the jobs' owners, each with only that partition's jobs (N is the
--     "pt" the Rust side writes into `m` right after the job id; when a call has jobs of several partitions,
--     each group says which of the call's events it holds, "n":[positions], so event ids stay the log's);
--   * on 'ferry:ev:q:{<queue>}' once, with all of them (a script call touches one queue);
--   * jobs whose m has no pt (enqueued by an older ferry) on evkey, 'ferry:events', as before partitions.
-- So a gateway subscribes to the partitions of its clients and the queues they follow, and gets nothing else.
-- Those are a standalone Redis's names (keys.rs, Layout): the channels take the event log's prefix, which is
-- 'ferry:' there and 'ferry:{<tag>}:' on a shard of a Redis Cluster, whose channels are then published with
-- SPUBLISH, in the slot of the shard's keys.
-- A message is published only on a channel with a subscriber (or, on a standalone Redis, while any pattern
-- subscription exists): nobody can receive the others, and a coalesced enqueue built one per submitter.
-- `by` (the actor, a JSON string) may be nil; a group marked `byo` says each event's actor is its job's owner.
-- Returns the log entry's id (nil when no group has a job: nothing is written).
local function emit(evkey, evmax, groups, by)
  local ng = {}
  -- The partition of the first job ('' for none), whether any other differs, and the call's queue. Usually
  -- every job of a call has the same partition: each is checked with one plain search for the first job's
  -- partition text, which makes no string; only a call of several partitions finds each job's.
  local first, key, mixed, queue = nil, nil, false, nil
  for _, g in ipairs(groups) do
    local jobs = g.jobs
    if #jobs > 0 then
      ng[#ng + 1] = g
      if first == nil then
        local e
        first, e = partition(jobs[1])
        -- The first job's text from the id's closing quote through the comma after its partition
        -- ('","pt":N,'): no m of another partition contains it.
        if first ~= '' then key = string.sub(jobs[1], e, e + 7 + #first) end
        queue = string.match(jobs[1], '"queue":"([^"]*)"')
      end
      if not mixed then
        for k = 1, #jobs do
          if key then
            if not string.find(jobs[k], key, 9, true) then
              mixed = true
              break
            end
          elseif partition(jobs[k]) ~= '' then
            mixed = true
            break
          end
        end
      end
    end
  end
  if #ng == 0 then return end
  -- The stored entry is written straight as pieces; the messages (built only when someone listens) write the
  -- groups again: copying pieces costs as much as making them.
  local stored = { '[' }
  for i, g in ipairs(ng) do
    if i > 1 then stored[#stored + 1] = ',' end
    head(stored, g, by)
    if g.specs then
      stored[#stored + 1] = ',"specs":['
      join(stored, g.specs, ',')
      stored[#stored + 1] = ']'
    end
    stored[#stored + 1] = '}'
  end
  stored[#stored + 1] = ']'
  local sid = redis.call('XADD', evkey, 'MAXLEN', '~', evmax, '*', 'e', table.concat(stored))
  -- evkey is '<prefix>events'; 'ferry:{' starts the prefix of a shard of a Redis Cluster.
  local prefix = string.sub(evkey, 1, #evkey - 6)
  local publish = 'PUBLISH'
  if string.byte(evkey, 7) == 123 then publish = 'SPUBLISH' end
  local function channel(pt)
    if pt == '' then return evkey end
    return prefix .. 'ev:p:' .. pt
  end
  -- The channels this call publishes on: its partitions' (in first-seen order), then its queue's.
  local order, parts, base = {}, nil, {}
  if not mixed then
    order[1] = first
  else
    -- Per partition, per group (in group order): the positions of its jobs in the partition (a list with the
    -- group's index as `gi`). Appended in call order, so a partition's positions of one group are one run. The
    -- work stays linear in the jobs however many groups and partitions one call holds (coalesced submits of
    -- many owners: a partition each).
    parts = {}
    local b = 0
    for gi, g in ipairs(ng) do
      base[gi] = b
      b = b + #g.jobs
      for k, m in ipairs(g.jobs) do
        local pt = partition(m)
        local part = parts[pt]
        if not part then
          part = {}
          parts[pt] = part
          order[#order + 1] = pt
        end
        local sel = part[#part]
        if not sel or sel.gi ~= gi then
          sel = { gi = gi }
          part[#part + 1] = sel
        end
        sel[#sel + 1] = k
      end
    end
  end
  local channels = {}
  for i, pt in ipairs(order) do channels[i] = channel(pt) end
  local qchannel = queue and (prefix .. 'ev:q:{' .. queue .. '}')
  if qchannel then channels[#channels + 1] = qchannel end
  -- Only messages someone will receive are built: Redis's Lua hashes every byte of every string a script makes,
  -- and under submit load a call built about one message per job for partitions nobody followed. A pattern
  -- subscriber (the all-events feed of `subscribe`, or anyone's PSUBSCRIBE) cannot be matched here cheaply:
  -- with any on the server, every channel counts as heard. Sharded channels have no patterns.
  local heard = {}
  local counts
  if publish == 'PUBLISH' then
    if redis.call('PUBSUB', 'NUMPAT') == 0 then counts = redis.call('PUBSUB', 'NUMSUB', unpack(channels)) end
  else
    counts = redis.call('PUBSUB', 'SHARDNUMSUB', unpack(channels))
  end
  for i = 1, #channels do heard[i] = not counts or counts[2 * i] > 0 end
  local all
  if (not mixed and heard[1]) or (qchannel and heard[#channels]) then
    all = { '{"sid":"', sid, '","events":[' }
    for i, g in ipairs(ng) do
      if i > 1 then all[#all + 1] = '},' end
      head(all, g, by)
    end
    all[#all + 1] = '}]}'
    all = table.concat(all)
  end
  if not mixed then
    if heard[1] then redis.call(publish, channels[1], all) end
  else
    for i, pt in ipairs(order) do
      if heard[i] then
        local msg = { '{"sid":"', sid, '","events":[' }
        for x, sel in ipairs(parts[pt]) do
          if x > 1 then msg[#msg + 1] = '},' end
          head(msg, ng[sel.gi], by, sel, base[sel.gi])
        end
        msg[#msg + 1] = '}]}'
        redis.call(publish, channels[i], table.concat(msg))
      end
    end
  end
  if qchannel and heard[#channels] then redis.call(publish, qchannel, all) end
  return sid
end

-- Fields of one stream entry as a table, or nil when the entry is gone.
local function entry(key, eid)
  local r = redis.call('XRANGE', key, eid, eid)
  if #r == 0 then return nil end
  local f, t = r[1][2], {}
  for i = 1, #f, 2 do t[f[i]] = f[i + 1] end
  return t
end

local function pack(t, p)
  return cjson.encode({ id = t.id, m = t.m, a = t.a, x = t.x, j = t.j, p = tostring(p) })
end

local function state_of(rec)
  return string.sub(rec, 3, 3)
end

local function parse_q(rec)
  local p, eid = string.match(rec, '^%["q",(%d),"([^"]+)"%]$')
  return tonumber(p), eid
end

-- Is the entry pending (leased) in the consumer group?
local function pending(key, eid)
  local r = redis.call('XPENDING', key, GROUP, eid, eid, 1)
  return #r > 0
end

-- Stream ids compare by their millisecond part, then their sequence.
local function id_parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end

local function id_lt(a, b)
  local am, as = id_parts(a)
  local bm, bs = id_parts(b)
  return am < bm or (am == bm and as < bs)
end

local function id_next(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return ms .. '-' .. (tonumber(seq) + 1)
end

-- The consumer group of a stream as a table (name, pending, last-delivered-id, lag, ...), or nil.
local function cgroup(key)
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
    local t = {}
    for i = 1, #g, 2 do t[g[i]] = g[i + 1] end
    if t.name == GROUP then return t end
  end
  return nil
end

-- Dead-letter a job (fields t) and keep the dead-letter stream at most `max` long, dropping the records of the
-- entries that fall off. Returns the dead-letter entry id.
local function bury(deadkey, jobskey, max, t, att, p, err, now)
  local did = redis.call('XADD', deadkey, '*', 'id', t.id, 'm', t.m, 'a', att, 'x', t.x, 'j', t.j, 'p', p, 'err', err, 'at', now)
  redis.call('HSET', jobskey, t.id, '["d",' .. now .. ',' .. att .. ',"' .. did .. '",' .. err .. ']')
  local over = redis.call('XLEN', deadkey) - tonumber(max)
  if over > 0 then
    local old = redis.call('XRANGE', deadkey, '-', '+', 'COUNT', over)
    for _, e in ipairs(old) do
      local rec = redis.call('HGET', jobskey, e[2][2])
      if rec and state_of(rec) == 'd' and string.find(rec, '"' .. e[1] .. '"', 1, true) then
        redis.call('HDEL', jobskey, e[2][2])
      end
    end
    redis.call('XTRIM', deadkey, 'MINID', id_next(old[#old][1]))
  end
  return did
end
