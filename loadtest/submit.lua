-- wrk script of `loadtest submit`: single-job POSTs, each with the next of the tokens in the file given after
-- `--` (one per line, one subject each), and one JSON line of results at the end (prefixed WRK_JSON).
local tokens, n, counter = {}, 0, 0
local body = '{"kind":"ferry.noop","payload":{}}'

function init(args)
  for line in io.lines(args[1]) do
    n = n + 1
    tokens[n] = line
  end
end

function request()
  counter = counter + 1
  local headers = {}
  headers["Authorization"] = "Bearer " .. tokens[(counter % n) + 1]
  headers["Content-Type"] = "application/json"
  return wrk.format("POST", wrk.path, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"non_2xx":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
