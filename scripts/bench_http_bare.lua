-- wrk script for the bare aiohttp reference of `scripts/bench.py http` (scripts/bench_http_bare.py).
wrk.method = "POST"
wrk.path = "/bare"
wrk.body = '{"amount":250,"reference":"d"}'
wrk.headers["Content-Type"] = "application/json"

function done(summary, latency, requests)
  io.write(string.format('WRK_RESULT {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99)))
end
