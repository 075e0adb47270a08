-- Shared helpers, prepended to every script.
-- Job stream entries have five fields in a fixed order: id, m (pre-rendered JSON object with job, queue, kind,
-- owner, tenant), a (attempts made before this entry), x (max attempts), j (the job spec as JSON).
-- Records in the jobs hash are JSON arrays whose first element is the state letter:
--   ["q",P,"EID"]                        queued or active (active = the entry is pending in the group)
--   ["s"|"r",RUN_AT,ATTEMPTS,PACK,ERR]   scheduled / retrying; PACK is a JSON string of the entry fields + p
--   ["c",AT,ATTEMPTS,P,"EID",RESULT]     completed; the spec stays in the (acknowledged) stream entry
--   ["x",AT,ATTEMPTS,PACK]               cancelled
--   ["d",AT,ATTEMPTS,"DEAD_EID",ERR]     dead; the spec is in the dead-letter stream entry
-- Events of a batch are grouped by type, and each group is written as
--   {"type":T,"state":S,"at":MS,"jobs":[M,...],"attempts":[N,...],"data":[D,...]}
-- where M is the job's `m` field (a JSON object with job, queue, kind, owner, tenant) taken as is: per job, the
-- scripts only append strings they already hold, which is what keeps events cheap in Redis CPU.
-- The time of this call by Redis's clock, in ms. Scripts never take "now" from the client: a request held up on
-- the way (a partition, a stalled connection, a paused server) would date its events, and compare its deadlines,
-- by when it was sent rather than when it took effect, and clients' clocks disagree. TIME may precede writes
-- because Redis 7 replicates scripts by their effects. Only times that are the client's to choose (a job's run-at,
-- its created_at) still come from the client.
local function clock_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function group(ty, state, now)
  return { ty = ty, state = state, at = now, jobs = {}, attempts = {}, data = nil }
end

-- `spec` (the job spec JSON) goes to the durable stream only.
local function add_spec(g, spec)
  g.specs = g.specs or {}
  g.specs[#g.jobs] = spec
end

local function add(g, m, attempt, data)
  local n = #g.jobs + 1
  g.jobs[n] = m
  g.attempts[n] = attempt
  if data then
    g.data = g.data or {}
    g.data[n] = data
  end
end

-- Append the non-empty groups as ONE entry of the durable per-shard stream, and publish the same once, without
-- the specs: those are for the recorder, which reads the stream. `by` (the actor, a JSON string) may be nil.
local function emit(evkey, evmax, groups, by)
  local heads, specs = {}, nil
  for _, g in ipairs(groups) do
    if #g.jobs > 0 then
      local s = '{"type":"' .. g.ty .. '","state":"' .. g.state .. '","at":' .. g.at .. ',"jobs":[' ..
        table.concat(g.jobs, ',') .. '],"attempts":[' .. table.concat(g.attempts, ',') .. ']'
      if g.data then s = s .. ',"data":[' .. table.concat(g.data, ',') .. ']' end
      if by and by ~= '' then s = s .. ',"by":' .. by end
      heads[#heads + 1] = s
      if g.specs then
        specs = specs or {}
        specs[#heads] = ',"specs":[' .. table.concat(g.specs, ',') .. ']'
      end
    end
  end
  if #heads == 0 then return end
  local body = '[' .. table.concat(heads, '},') .. '}]'
  local stored = body
  if specs then
    local parts = {}
    for k, h in ipairs(heads) do parts[k] = h .. (specs[k] or '') .. '}' end
    stored = '[' .. table.concat(parts, ',') .. ']'
  end
  local sid = redis.call('XADD', evkey, 'MAXLEN', '~', evmax, '*', 'e', stored)
  redis.call('PUBLISH', evkey, '{"sid":"' .. sid .. '","events":' .. body .. '}')
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

-- Is the entry pending (leased) in the workers group?
local function pending(key, eid)
  local r = redis.call('XPENDING', key, 'workers', eid, eid, 1)
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

-- The workers group of a stream as a table (name, pending, last-delivered-id, lag, ...), or nil.
local function cgroup(key)
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
    local t = {}
    for i = 1, #g, 2 do t[g[i]] = g[i + 1] end
    if t.name == 'workers' then return t end
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
