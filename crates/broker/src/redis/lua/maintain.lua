-- KEYS: p0 p1 p2 jobs fin
-- ARGV: retention_ms batch
-- Trims acknowledged entries older than the retention (never a pending or undelivered one: the cut is below
-- both the oldest pending id and the group's next undelivered id), dropping the completed records that point
-- at them; expires cancelled records. At most `batch` entries per key per call. (The dead-letter stream is
-- capped when a job is buried.)
-- Redis's clock, as the stream entry ids it is compared with are.
local now, ret, batch = clock_ms(), tonumber(ARGV[1]), tonumber(ARGV[2])
local removed = 0
local function drop_records(entries, letter)
  for _, e in ipairs(entries) do
    local id = e[2][2]
    local rec = redis.call('HGET', KEYS[4], id)
    if rec and state_of(rec) == letter and string.find(rec, '"' .. e[1] .. '"', 1, true) then
      redis.call('HDEL', KEYS[4], id)
      removed = removed + 1
    end
  end
end
for p = 1, 3 do
  local key = KEYS[p]
  if redis.call('EXISTS', key) == 1 then
    local g = cgroup(key)
    if g then
      local minid = tostring(math.max(now - ret, 0)) .. '-0'
      local undelivered = id_next(g['last-delivered-id'])
      if id_lt(undelivered, minid) then minid = undelivered end
      if g.pending > 0 then
        local oldest = redis.call('XPENDING', key, GROUP)[2]
        if id_lt(oldest, minid) then minid = oldest end
      end
      local old = redis.call('XRANGE', key, '-', '(' .. minid, 'COUNT', batch)
      if #old > 0 then
        drop_records(old, 'c')
        local cut = minid
        if #old == batch then cut = id_next(old[#old][1]) end
        redis.call('XTRIM', key, 'MINID', cut)
      end
    end
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now - ret, 'LIMIT', 0, batch)) do
  local rec = redis.call('HGET', KEYS[4], id)
  if rec and state_of(rec) == 'x' then
    redis.call('HDEL', KEYS[4], id)
    removed = removed + 1
  end
  redis.call('ZREM', KEYS[5], id)
end
return removed
