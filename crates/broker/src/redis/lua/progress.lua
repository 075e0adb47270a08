-- KEYS: stream events
-- ARGV: now evmax eid attempt m data actor
if not pending(KEYS[1], ARGV[3]) then return 0 end
local g = group('job.progress', 'active', ARGV[1])
add(g, ARGV[5], ARGV[4], ARGV[6])
emit(KEYS[2], ARGV[2], { g }, ARGV[7])
return 1
