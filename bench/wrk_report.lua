-- wrk script: a random token of the file given as the first argument per request, and
-- one JSON line of figures at the end (prefix WRKJSON, read by bench/e2e.py). A second
-- argument "close" asks for a new connection per request (Connection: close).
local tokens = {}
local headers = {}

function init(args)
  for line in io.lines(args[1]) do
    tokens[#tokens + 1] = line
  end
  if args[2] == "close" then
    headers["Connection"] = "close"
  end
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 100000)
end

function request()
  headers["Authorization"] = "Bearer " .. tokens[math.random(#tokens)]
  return wrk.format("GET", "/me", headers)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "errors": {"connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d}, "latency_us": {"mean": %.1f, "p50": %d, ' ..
    '"p90": %d, "p99": %d, "p999": %d, "max": %d}}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end
