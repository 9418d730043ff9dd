#!lua
-- distribute: one tick of a distributor linking a child pool to its parent pool
-- (Girder's hierarchy).
--
-- KEYS[1]  q:<child>      LIST  the child pool's queue
-- KEYS[2]  q:<parent>     LIST  the parent pool's queue
-- KEYS[3]  idle:<child>   HASH  idle workers of the child pool
-- KEYS[4]  idle:<parent>  HASH  idle workers of the parent pool
-- KEYS[5]  stats          HASH  grid-wide counters
-- ARGV[1]  distributor id
-- ARGV[2]  max moves per tick, each way
-- Derived keys: none.
--  * volunteers down: while the child pool has more idle workers than queued requests,
--    requests move from the parent queue to the child queue;
--  * overflow up: while the parent pool has idle takers (sibling distributors that
--    volunteered) and the child queue holds more than its idle workers can take,
--    requests move from the child queue to the parent queue;
--  * the distributor stands in as an idle worker of the parent pool while its child
--    pool has spare workers, and as an idle worker of the child pool while the parent
--    has spare takers, so workers' sharing and sibling distributors see the capacity.
-- Returns {moved down, moved up}.
local cq, pq, cidle_key, pidle_key, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local me, max = ARGV[1], tonumber(ARGV[2])
local child_idle = redis.call('HLEN', cidle_key) - redis.call('HEXISTS', cidle_key, me)
local parent_idle = redis.call('HLEN', pidle_key) - redis.call('HEXISTS', pidle_key, me)
local child_q, parent_q = redis.call('LLEN', cq), redis.call('LLEN', pq)
local down, up = 0, 0
while down < max and child_idle > child_q + down and parent_q - down > 0 do
  redis.call('LMOVE', pq, cq, 'RIGHT', 'LEFT')
  down = down + 1
end
child_q, parent_q = child_q + down, parent_q - down
while up < max and child_q - up > child_idle and parent_idle > parent_q + up do
  redis.call('LMOVE', cq, pq, 'LEFT', 'LEFT')
  up = up + 1
end
local now = redis.call('TIME')[1]
if child_idle > child_q then redis.call('HSET', pidle_key, me, now)
else redis.call('HDEL', pidle_key, me) end
if parent_idle > parent_q then redis.call('HSET', cidle_key, me, now)
else redis.call('HDEL', cidle_key, me) end
if down + up > 0 then redis.call('HINCRBY', stats, 'distributed', down + up) end
return {down, up}
