#!lua
-- share: move requests from a worker's stack to its pool queue (local -> queued).
--
-- KEYS[1]  q:<pool>        LIST  the pool queue
-- KEYS[2]  idle:<pool>     HASH  idle workers of the pool
-- KEYS[3]  owned:<worker>  SET   the worker's local requests
-- KEYS[4]  stats           HASH  grid-wide counters
-- then st:<id> (HASH) per candidate, in the order of ARGV
-- ARGV[1]  worker id
-- ARGV[2]  force: '1' moves them all, '0' only while some worker of the pool is idle
-- then the candidate ids, bottom of the worker's stack first
-- Derived keys: none.
-- While some worker of the pool is idle and the queue is shorter than the offer, moves
-- the candidates from the worker's stack to the pool queue.  Returns the ids it moved.
local q, idle, owned, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local worker, force = ARGV[1], ARGV[2]
if #KEYS - 4 ~= #ARGV - 2 then
  return redis.error_reply('ERR pygirder share: ' .. (#KEYS - 4) .. ' keys for '
                           .. (#ARGV - 2) .. ' ids; expected one per id')
end
local want = 0
if force == '1' then
  want = #ARGV - 2
elseif redis.call('HLEN', idle) > 0 then
  want = #ARGV - 2 - redis.call('LLEN', q)
end
local out = {}
local i = 3
while want > 0 and i <= #ARGV do
  local id = ARGV[i]
  local st = KEYS[i + 2]
  if redis.call('HGET', st, 's') == 'local' and redis.call('HGET', st, 'o') == worker then
    redis.call('HSET', st, 's', 'queued')
    redis.call('HDEL', st, 'o')
    redis.call('SREM', owned, id)
    redis.call('LPUSH', q, id)
    out[#out + 1] = id
    want = want - 1
  end
  i = i + 1
end
if #out > 0 then redis.call('HINCRBY', stats, 'moved_to_pool', #out) end
return out
