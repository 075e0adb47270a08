-- KEYS: p0 p1 p2 jobs events dead
-- ARGV: min_idle_ms max evmax deadmax
-- Entries pending longer than the visibility timeout without a heartbeat: requeue them as new entries, or
-- dead-letter them when their attempts are used up. Claim + acknowledge happen in this one script, so an entry
-- never stays owned by the reaper and the stale holder's XACK (its completion) returns 0.
local idle, max, evmax, deadmax, now = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], clock_ms()
local requeued, dead = 0, 0
local gq, gd = group('job.queued', 'queued', now), group('job.dead', 'dead', now)
for p = 0, 2 do
  local key = KEYS[p + 1]
  if max > 0 and redis.call('EXISTS', key) == 1 then
    local r = redis.pcall('XAUTOCLAIM', key, GROUP, 'ferry-reaper', idle, '0-0', 'COUNT', max)
    if type(r) == 'table' and not r.err then
      for _, e in ipairs(r[2]) do
        local eid, f = e[1], e[2]
        local t = {}
        for i = 1, #f, 2 do t[f[i]] = f[i + 1] end
        redis.call('XACK', key, GROUP, eid)
        local att = tonumber(t.a) + 1
        if att >= tonumber(t.x) then
          local err = '"lease expired after ' .. att .. ' attempts"'
          bury(KEYS[6], KEYS[4], deadmax, t, att, p, err, now)
          add(gd, t.m, att, '{"error":' .. err .. '}')
          dead = dead + 1
        else
          local nid = redis.call('XADD', key, '*', 'id', t.id, 'm', t.m, 'a', att, 'x', t.x, 'j', t.j)
          redis.call('HSET', KEYS[4], t.id, '["q",' .. p .. ',"' .. nid .. '"]')
          add(gq, t.m, att, '{"reclaimed":true}')
          requeued = requeued + 1
        end
        max = max - 1
      end
    end
  end
end
emit(KEYS[5], evmax, { gq, gd })
return { requeued, dead }
