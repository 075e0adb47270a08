-- A `job.progress` event for a job whose lease is still held. Returns 1, or 0 when the lease is gone.
local stream_key = KEYS[1] -- the job's priority stream
local events_key = KEYS[2]
local evmax = ARGV[1]
local eid = ARGV[2]
local att = ARGV[3]
local m = ARGV[4]
local data = ARGV[5]
local actor = ARGV[6] -- the lease holder as a JSON string
if not pending(stream_key, eid) then return 0 end
local g = group('job.progress', 'active', clock_ms())
add(g, m, att, data)
emit(events_key, evmax, { g }, actor)
return 1
