#!lua
-- take: claim up to max requests of a pool queue for a worker (queued -> running).
--
-- KEYS[1]  q:<pool>           LIST  the pool queue
-- KEYS[2]  inflight:<worker>  LIST  what the worker took and has not finished
-- KEYS[3]  idle:<pool>        HASH  idle workers of the pool
-- KEYS[4]  stats              HASH  grid-wide counters
-- KEYS[5]  offers:<pool>      ZSET  workers whose offer found no idle worker (share.lua)
-- KEYS[6..8] with ARGV[9]: st:<id>, res:<id>, call:<id> of that id
-- ARGV[1]  worker id
-- ARGV[2]  max requests to claim
-- ARGV[3]  stem of st:<id> keys, ARGV[4] of res:<id>, ARGV[5] of call:<id>
-- ARGV[6]  '1': the worker waits for work if this claims nothing; it is then marked
--          in idle:<pool> as taking hand-offs ('h' .. time, see submit) and wakes the
--          latest offerer of KEYS[5] (a worker that ran dry gets work at once, however
--          long the offerer's share period has grown); '0': not
-- ARGV[7]  stem of inbox keys (Keys.inbox('')), ARGV[8] the message that tells a worker
--          to offer its surplus now
-- ARGV[9]  (optional) id already moved into the in-flight list by BLMOVE
-- Derived keys: st:<id>, res:<id> and call:<id> of each id moved off the queue are the
-- stems ARGV[3..5] (Keys.state(''), ...) followed by the id: the stems carry the
-- namespace's hash tag, so these keys share the slot of KEYS; so does the inbox of a
-- woken offerer, the stem ARGV[7] followed by its id.
-- Returns {id1, payload1, deaths1, id2, ...}; deaths counts the workers that died
-- while holding the request.  Only a request in state 'queued' is claimed; any other
-- entry is stale and dropped on the way: the request finished, is unknown, was
-- cancelled (cancel leaves its entry here), or another entry of it was claimed already
-- (a request submitted again after a cancel has two entries).  At most
-- 4 * max + DROP_BUDGET entries are looked at per call, so a queue full of stale
-- entries is drained a bounded step at a time.
local q, inflight, idle, stats, offers = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local worker, max = ARGV[1], tonumber(ARGV[2])
local st_stem, res_stem, call_stem = ARGV[3], ARGV[4], ARGV[5]
local waits = ARGV[6] == '1'
local out = {}
local dropped = 0
local function claim(id, st, res, c)
  local fields = redis.call('HMGET', st, 's', 'p')
  local payload = fields[2]
  if fields[1] == 'queued' and payload and redis.call('EXISTS', res) == 0 then
    redis.call('HSET', st, 's', 'running', 'o', worker)
    redis.call('HINCRBY', st, 'n', 1)
    local suspect = redis.call('HGET', st, 'd')
    if redis.call('EXISTS', c) == 1 then
      redis.call('HSET', c, 'state', 'taken', 'worker', worker)
    end
    out[#out + 1] = id
    out[#out + 1] = payload
    out[#out + 1] = suspect or '0'
  else
    redis.call('LREM', inflight, 1, id)
    dropped = dropped + 1
  end
end
if ARGV[9] then
  if #KEYS ~= 8 then
    return redis.error_reply('ERR pygirder take: a moved id needs its 3 keys, got '
                             .. (#KEYS - 5))
  end
  claim(ARGV[9], KEYS[6], KEYS[7], KEYS[8])
end
-- Take a fair share only: with a short queue and idle peers, one worker must not
-- swallow everything (each idle peer and this worker get an equal part).
local peers = redis.call('HLEN', idle) - redis.call('HEXISTS', idle, worker)
local share = math.floor(redis.call('LLEN', q) / (peers + 1))
if share < max then max = math.max(1, share) end
local tries = 0
while #out < 3 * max and tries < 4 * max + DROP_BUDGET do
  tries = tries + 1
  local id = redis.call('LMOVE', q, inflight, 'RIGHT', 'LEFT')
  if not id then break end
  claim(id, st_stem .. id, res_stem .. id, call_stem .. id)
end
if #out > 0 then
  redis.call('HDEL', idle, worker)
elseif waits then
  local now = redis.call('TIME')
  redis.call('HSET', idle, worker, 'h' .. now[1] .. '.' .. string.format('%06d', now[2]))
  redis.call('ZREM', offers, worker)
  local latest = redis.call('ZPOPMAX', offers)
  if #latest > 0 then
    local box = ARGV[7] .. latest[1]
    redis.call('LPUSH', box, ARGV[8])
    redis.call('EXPIRE', box, INBOX_TTL)
  end
end
if dropped > 0 then
  -- stale: entries cancel left in queues that no take has dropped yet.  Every dropped
  -- entry counts against it, down to 0 (an entry left behind otherwise, e.g. by a
  -- request that finished while queued, makes it undercount, never go negative).
  local stale = tonumber(redis.call('HGET', stats, 'stale') or '0')
  if stale > 0 then redis.call('HINCRBY', stats, 'stale', -math.min(stale, dropped)) end
  redis.call('HINCRBY', stats, 'dropped', dropped)
end
return out
