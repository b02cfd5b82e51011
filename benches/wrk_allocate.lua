-- wrk script for benches/compare_central_stores.sh: every request allocates a
-- fresh idempotency key (POST /v1/allocations), like pgbench's INSERT and
-- redis-benchmark's SET NX against the central stores.
--
--   wrk -t2 -c50 -d10s --latency -s benches/wrk_allocate.lua http://127.0.0.1:7700
--
-- Keys are "wrk-<start time>-<thread>-<counter>": unique across the threads
-- of one run (each thread has its own counter) and across runs.

local threads = 0

function setup(thread)
  thread:set("thread_id", threads)
  threads = threads + 1
end

function init(args)
  prefix = "wrk-" .. os.time() .. "-" .. thread_id .. "-"
  counter = 0
  headers = { ["Content-Type"] = "application/json" }
end

function request()
  counter = counter + 1
  local body = '{"key":"' .. prefix .. counter .. '","payload":{"amount":100,"currency":"EUR"}}'
  return wrk.format("POST", "/v1/allocations", headers, body)
end
