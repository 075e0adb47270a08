-- Entries pending longer than the visibility timeout without a heartbeat: requeue them as new entries, or
-- dead-letter them when their attempts are used up. Claim + acknowledge happen in this one script, so an entry
-- never stays owned by the reaper and the stale holder's XACK (its completion) returns 0.
-- Returns {requeued, dead}.
local streams = { KEYS[1], KEYS[2], KEYS[3] } -- by priority: high, normal, low
local jobs_key = KEYS[4]
local events_key = KEYS[5]
local dead_key = KEYS[6]
local min_idle_ms = ARGV[1] -- the visibility timeout
local max = tonumber(ARGV[2])
local evmax = ARGV[3]
local deadmax = ARGV[4]
local now = clock_ms()
local requeued, dead = 0, 0
local gq, gd = group('job.queued', 'queued', now), group('job.dead', 'dead', now)
for p = 0, 2 do
  local key = streams[p + 1]
  if max > 0 and redis.call('EXISTS', key) == 1 then
    local r = redis.pcall('XAUTOCLAIM', key, GROUP, 'ferry-reaper', min_idle_ms, '0-0', 'COUNT', max)
    if type(r) == 'table' and not r.err then
      for _, e in ipairs(r[2]) do
        local eid, f = e[1], e[2]
        local t = {}
        for i = 1, #f, 2 do t[f[i]] = f[i + 1] end
        redis.call('XACK', key, GROUP, eid)
        local att = tonumber(t.a) + 1
        if att >= tonumber(t.x) then
          local err = '"lease expired after ' .. att .. ' attempts"'
          bury(dead_key, jobs_key, deadmax, t, att, p, err, now)
          add(gd, t.m, att, '{"error":' .. err .. '}')
          dead = dead + 1
        else
          local nid = redis.call('XADD', key, '*', 'id', t.id, 'm', t.m, 'a', att, 'x', t.x, 'j', t.j)
          redis.call('HSET', jobs_key, t.id, '["q",' .. p .. ',"' .. nid .. '"]')
          add(gq, t.m, att, '{"reclaimed":true}')
          requeued = requeued + 1
        end
        max = max - 1
      end
    end
  end
end
emit(events_key, evmax, { gq, gd })
return { requeued, dead }
