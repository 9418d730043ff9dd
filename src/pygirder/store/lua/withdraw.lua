#!lua
-- withdraw: take a dead client out of what it waited for.
--
-- KEYS[1]  hb:<process>     STRING  the client's heartbeat
-- KEYS[2]  waits:<process>  SET     what it waits for
-- KEYS[3]  inbox:<process>  LIST    its inbox (also the member of wt:<id> to remove)
-- KEYS[4]  wprocs           SET     clients that have a waits set
-- KEYS[5]  stats            HASH    grid-wide counters
-- ARGV[1]  the client's process id
-- ARGV[2]  max ids to handle
-- ARGV[3]  stem of wt:<id> keys, ARGV[4] of st:<id>, ARGV[5] of call:<id>
-- Derived keys: wt:<id>, st:<id> and call:<id> of the ids popped from KEYS[2] are the
-- stems ARGV[3..5] (Keys.waiters(''), ...) followed by the id: the stems carry the
-- namespace's hash tag, so these keys share the slot of KEYS.
-- The client has no heartbeat any more (it died): withdraw its inbox from the waiter
-- sets of up to max of the requests it waited for.  A request that nobody waits for
-- any more and that has not started is cancelled as cancel does (its state goes, its
-- queue entry is left for take to drop) and counted as abandoned, unless a worker died
-- holding it (field d): its strikes must be kept until it is failed as poison or
-- finishes.  Once nothing is left, the client and its inbox are forgotten.
-- Returns {ids withdrawn, abandoned, ids left}.
local hb, waits, inbox, wprocs, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local pid, max = ARGV[1], tonumber(ARGV[2])
local wt_stem, st_stem, call_stem = ARGV[3], ARGV[4], ARGV[5]
if redis.call('EXISTS', hb) == 1 then return {0, 0, 0} end  -- alive again
local ids = redis.call('SPOP', waits, max)
local abandoned = 0
for _, id in ipairs(ids) do
  local wt = wt_stem .. id
  redis.call('SREM', wt, inbox)
  local st = st_stem .. id
  if redis.call('SCARD', wt) == 0 and redis.call('HGET', st, 's') == 'queued'
      and not redis.call('HGET', st, 'd') then
    redis.call('DEL', st)
    local c = call_stem .. id
    if redis.call('EXISTS', c) == 1 then redis.call('HSET', c, 'state', 'cancelled') end
    abandoned = abandoned + 1
  end
end
local left = redis.call('SCARD', waits)
if left == 0 then
  redis.call('SREM', wprocs, pid)
  redis.call('DEL', inbox)
end
if abandoned > 0 then
  redis.call('HINCRBY', stats, 'abandoned', abandoned)
  redis.call('HINCRBY', stats, 'stale', abandoned)
end
return {#ids, abandoned, left}
