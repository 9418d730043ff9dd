#!lua
-- share: move requests from a worker's stack to its pool queue (local or taken but not
-- started -> queued).
--
-- KEYS[1]  q:<pool>           LIST  the pool queue
-- KEYS[2]  idle:<pool>        HASH  idle workers of the pool
-- KEYS[3]  owned:<worker>     SET   the worker's local requests
-- KEYS[4]  stats              HASH  grid-wide counters
-- KEYS[5]  offers:<pool>      ZSET  workers whose offer found no idle worker
-- KEYS[6]  inflight:<worker>  LIST  what the worker took and has not finished
-- then st:<id> (HASH) per candidate, in the order of ARGV
-- ARGV[1]  worker id
-- ARGV[2]  force: '1' moves them all, '0' only while some worker of the pool is idle
-- then the candidate ids, bottom of the worker's stack first: its own sub-calls
--          (state local) or requests it took from the queue and has not started (state
--          running, in its in-flight list; the worker offers only what it has not started)
-- Derived keys: none.
-- While some worker of the pool is idle and the queue is shorter than the offer, moves
-- the candidates from the worker's stack to the pool queue.  With no worker idle, the
-- offer is recorded in offers:<pool> instead (the worker's id, scored by time), so the
-- next worker to go idle wakes this one at once (take.lua, complete.lua).  Returns the ids it moved.
local q, idle, owned, stats, offers = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local inflight = KEYS[6]
local worker, force = ARGV[1], ARGV[2]
if #KEYS - 6 ~= #ARGV - 2 then
  return redis.error_reply('ERR pygirder share: ' .. (#KEYS - 6) .. ' keys for '
                           .. (#ARGV - 2) .. ' ids; expected one per id')
end
local want = 0
if force == '1' then
  want = #ARGV - 2
elseif redis.call('HLEN', idle) > 0 then
  want = #ARGV - 2 - redis.call('LLEN', q)
elseif #ARGV > 2 then
  local now = redis.call('TIME')
  redis.call('ZADD', offers, now[1] + now[2] / 1e6, worker)
end
local out = {}
local i = 3
while want > 0 and i <= #ARGV do
  local id = ARGV[i]
  local st = KEYS[i + 4]
  local fields = redis.call('HMGET', st, 's', 'o')
  local moved = false
  if fields[2] == worker and fields[1] == 'local' then
    redis.call('SREM', owned, id)
    moved = true
  elseif fields[2] == worker and fields[1] == 'running' then
    moved = redis.call('LREM', inflight, 1, id) == 1  -- taken, and held by this worker
    if moved then redis.call('HINCRBY', st, 'n', -1) end  -- the take is undone
  end
  if moved then
    redis.call('HSET', st, 's', 'queued')
    redis.call('HDEL', st, 'o')
    redis.call('LPUSH', q, id)
    out[#out + 1] = id
    want = want - 1
  end
  i = i + 1
end
if #out > 0 then redis.call('HINCRBY', stats, 'moved_to_pool', #out) end
return out
