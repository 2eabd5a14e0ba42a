-- wrk -s benchmarks/alternate.lua: each request takes the next of the comma-separated paths in
-- $BENCH_PATHS, round and round, so every variant gets the same load, interleaved.
local requests = nil
local n = 0
request = function()
  if requests == nil then -- formatted on first use, once wrk has set the Host header
    requests = {}
    for path in string.gmatch(os.getenv("BENCH_PATHS"), "[^,]+") do
      requests[#requests + 1] = wrk.format("GET", path)
    end
  end
  n = n % #requests + 1
  return requests[n]
end
