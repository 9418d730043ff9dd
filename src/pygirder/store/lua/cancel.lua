#!lua
-- cancel: a process no longer waits for these requests (queued -> gone).
--
-- KEYS[1]  stats  HASH  grid-wide counters
-- then 3 per id of ARGV, in order: wt:<id> SET, st:<id> HASH, call:<id> HASH
-- ARGV[1]  the process's inbox key (a member of wt:<id>)
-- then ids (at most CANCEL_CHUNK of them)
-- Derived keys: none.
-- A request nobody waits for any more and that has not started is cancelled: its state
-- goes (so it can be submitted again) and its call record says 'cancelled'.  Its queue
-- entry stays: removing it here would scan the whole queue once per id; take drops it
-- when it gets there.  The stats field 'stale' counts such entries not yet dropped.
-- Returns the ids that were cancelled.
local stats, inbox = KEYS[1], ARGV[1]
if #ARGV - 1 > CANCEL_CHUNK then
  return redis.error_reply('ERR pygirder cancel: at most ' .. CANCEL_CHUNK
                           .. ' ids per call, got ' .. (#ARGV - 1) .. '; send them in chunks')
end
if #KEYS - 1 ~= 3 * (#ARGV - 1) then
  return redis.error_reply('ERR pygirder cancel: ' .. (#KEYS - 1) .. ' keys for '
                           .. (#ARGV - 1) .. ' ids; expected 3 per id')
end
local out = {}
for i = 2, #ARGV do
  local id = ARGV[i]
  local k = 1 + 3 * (i - 2)
  local wt, st, c = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  redis.call('SREM', wt, inbox)
  if redis.call('SCARD', wt) == 0 and redis.call('HGET', st, 's') == 'queued' then
    redis.call('DEL', st)
    if redis.call('EXISTS', c) == 1 then redis.call('HSET', c, 'state', 'cancelled') end
    out[#out + 1] = id
  end
end
if #out > 0 then
  redis.call('HINCRBY', stats, 'cancelled', #out)
  redis.call('HINCRBY', stats, 'stale', #out)
end
return out
