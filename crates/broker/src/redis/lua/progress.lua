-- KEYS: stream events
-- ARGV: evmax eid attempt m data actor
if not pending(KEYS[1], ARGV[2]) then return 0 end
local g = group('job.progress', 'active', clock_ms())
add(g, ARGV[4], ARGV[3], ARGV[5])
emit(KEYS[2], ARGV[1], { g }, ARGV[6])
return 1
