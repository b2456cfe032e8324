-- Requests that may each be sent once (SSO assertions, signed hub calls), read from the file
-- $WRK_REQUESTS: one request a line, tab-separated: METHOD, PATH, BODY (may be empty), then
-- "Name: value" headers. Thread i of $WRK_THREADS sends lines i, i+n, i+2n... in order; when a
-- thread runs out it repeats its last line (the server refuses it: counted in err_status).
local threads = 0

function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

local function split(line)
  local parts, start = {}, 1
  while true do
    local i = string.find(line, "\t", start, true)
    if not i then
      table.insert(parts, string.sub(line, start))
      return parts
    end
    table.insert(parts, string.sub(line, start, i - 1))
    start = i + 1
  end
end

function init(args)
  local n = tonumber(os.getenv("WRK_THREADS") or "2")
  reqs, idx = {}, 0
  local i = 0
  for line in io.lines(os.getenv("WRK_REQUESTS")) do
    if i % n == tid then
      local p = split(line)
      local headers = {}
      for j = 4, #p do
        local k, v = string.match(p[j], "^([^:]+):%s*(.*)$")
        if k then headers[k] = v end
      end
      local body = p[3]
      if body == "" then body = nil end
      table.insert(reqs, wrk.format(p[1], p[2], headers, body))
    end
    i = i + 1
  end
end

function request()
  idx = idx + 1
  if idx > #reqs then return reqs[#reqs] end
  return reqs[idx]
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
