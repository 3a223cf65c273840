-- wrk script for `scripts/bench.py http`: the command mix of bench_http.py, from a compiled load
-- generator. Arguments (after --): the bearer token, then the wallet ids.
-- Mix per step: 30 % debit, 30 % credit, 20 % reserve (its confirm or rollback follows, as soon as the
-- reservation's answer is in), 20 % wallet read. Every POST carries a fresh Idempotency-Key.
-- At the end, one line "WRK_RESULT {json}" with the request count, latency percentiles and errors.

local threads = {}

function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  token = args[1]
  wallets = {}
  for i = 2, #args do wallets[#wallets + 1] = args[i] end
  follow_ups = {}   -- reservations answered and waiting for their confirm or rollback
  sent = 0
  errors = 0
  error_kinds = {}
  math.randomseed(os.time() + id * 7919)
end

local function key()
  sent = sent + 1
  return string.format("wrk-%d-%d-%08x%08x", id, sent, math.random(0, 0x7fffffff), math.random(0, 0x7fffffff))
end

local function post(path, body)
  return wrk.format("POST", path, {
    ["Authorization"] = "Bearer " .. token,
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = key(),
  }, body)
end

function request()
  local pending = table.remove(follow_ups)
  if pending ~= nil then
    local action = (math.random() < 0.5) and "confirm" or "rollback"
    return post(string.format("/v1/wallets/%s/reservations/%s/%s", pending[1], pending[2], action), "{}")
  end
  local wallet = wallets[math.random(#wallets)]
  local roll = math.random()
  local amount = math.random(1, 500)
  if roll < 0.3 then
    return post("/v1/wallets/" .. wallet .. "/debits", string.format('{"amount":%d,"reference":"d"}', amount))
  elseif roll < 0.6 then
    return post("/v1/wallets/" .. wallet .. "/credits", string.format('{"amount":%d,"reference":"c"}', amount))
  elseif roll < 0.8 then
    return post("/v1/wallets/" .. wallet .. "/reservations",
                string.format('{"amount":%d,"ttl_seconds":300}', amount))
  end
  return wrk.format("GET", "/v1/wallets/" .. wallet, {["Authorization"] = "Bearer " .. token})
end

function response(status, headers, body)
  if status >= 300 then
    errors = errors + 1
    local kind = tostring(status) .. " " .. (string.match(body or "", '"code":"([%w_]+)"') or "?")
    error_kinds[kind] = (error_kinds[kind] or 0) + 1
    return
  end
  if status == 201 then  -- only a reservation answers 201 in this mix
    local reservation = string.match(body, '"reservation_id":"([%x%-]+)"')
    local wallet = string.match(body, '"wallet_id":"([%x%-]+)"')
    if reservation and wallet then table.insert(follow_ups, {wallet, reservation}) end
  end
end

function done(summary, latency, requests)
  local errs, kinds = 0, {}
  for _, thread in ipairs(threads) do
    errs = errs + thread:get("errors")
    for kind, count in pairs(thread:get("error_kinds")) do kinds[#kinds + 1] = string.format('"%s":%d', kind, count) end
  end
  local socket_errors = summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,' ..
    '"errors":%d,' ..
    '"socket_errors":%d,"error_kinds":{%s}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max,
    errs, socket_errors, table.concat(kinds, ",")))
end
