-- One request repeated; optional method and JSON body from the environment; one
-- machine-readable "WRKJSON {...}" summary line at the end.
--   WRK_METHOD=POST WRK_BODY='{"username":"alice",...}' wrk -s bench/wrk/bench.lua ...
local method = os.getenv("WRK_METHOD")
if method and method ~= "" then wrk.method = method end
local body = os.getenv("WRK_BODY")
if body and body ~= "" then
  wrk.body = body
  wrk.headers["Content-Type"] = "application/json"
end

done = function(summary, latency, requests)
  local s = summary.duration / 1e6
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_s": %.3f, "rps": %.2f, "p50_ms": %.3f, "p90_ms": %.3f, ' ..
    '"p99_ms": %.3f, "mean_ms": %.3f, "max_ms": %.3f, "err_connect": %d, "err_read": %d, ' ..
    '"err_write": %d, "err_status": %d, "err_timeout": %d}\n',
    summary.requests, s, summary.requests / s, latency:percentile(50) / 1e3,
    latency:percentile(90) / 1e3, latency:percentile(99) / 1e3, latency.mean / 1e3,
    latency.max / 1e3, e.connect, e.read, e.write, e.status, e.timeout))
end
