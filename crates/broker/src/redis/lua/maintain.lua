-- Trims acknowledged entries older than the retention (never a pending or undelivered one: the cut is below
-- both the oldest pending id and the group's next undelivered id), dropping the completed records that point
-- at them; expires cancelled records. At most `batch` entries per key per call. (The dead-letter stream is
-- capped when a job is buried.)
local streams = { KEYS[1], KEYS[2], KEYS[3] } -- by priority: high, normal, low
local jobs_key = KEYS[4]
local fin_key = KEYS[5]
local retention_ms = tonumber(ARGV[1])
local batch = tonumber(ARGV[2])
-- Redis's clock, as the stream entry ids it is compared with are.
local now = clock_ms()
local removed = 0
local function drop_records(entries, letter)
  for _, e in ipairs(entries) do
    local id = e[2][2]
    local rec = redis.call('HGET', jobs_key, id)
    if rec and state_of(rec) == letter and string.find(rec, '"' .. e[1] .. '"', 1, true) then
      redis.call('HDEL', jobs_key, id)
      removed = removed + 1
    end
  end
end
for p = 1, 3 do
  local key = streams[p]
  if redis.call('EXISTS', key) == 1 then
    local g = cgroup(key)
    if g then
      local minid = tostring(math.max(now - retention_ms, 0)) .. '-0'
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
for _, id in ipairs(redis.call('ZRANGEBYSCORE', fin_key, '-inf', now - retention_ms, 'LIMIT', 0, batch)) do
  local rec = redis.call('HGET', jobs_key, id)
  if rec and state_of(rec) == 'x' then
    redis.call('HDEL', jobs_key, id)
    removed = removed + 1
  end
  redis.call('ZREM', fin_key, id)
end
return removed
