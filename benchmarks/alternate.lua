-- wrk -s benchmarks/alternate.lua: the comma-separated paths in $BENCH_PATHS in turn, each in every
-- cycle, in a fresh random order per cycle: every variant gets the same share of the load and no
-- variant always follows the same one (on one connection, what ran just before a request would
-- otherwise bias it: the caches it leaves, the garbage it leaves to collect).
local requests = nil
local order = {}
local n = 0
request = function()
  if requests == nil then -- formatted on first use, once wrk has set the Host header
    requests = {}
    for path in string.gmatch(os.getenv("BENCH_PATHS"), "[^,]+") do
      requests[#requests + 1] = wrk.format("GET", path)
      order[#requests] = #requests
    end
    math.randomseed(os.time())
    n = #order
  end
  if n == #order then
    n = 0
    for i = #order, 2, -1 do
      local j = math.random(i)
      order[i], order[j] = order[j], order[i]
    end
  end
  n = n + 1
  return requests[order[n]]
end
