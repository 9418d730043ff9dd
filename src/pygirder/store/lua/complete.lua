#!lua
-- complete: store results and wake their waiters (running -> done).
--
-- KEYS[1]  owned:<worker>     SET   the worker's local requests
-- KEYS[2]  inflight:<worker>  LIST  what the worker took and has not finished
-- KEYS[3]  stats              HASH  grid-wide counters
-- KEYS[4]  failures           LIST  the most recent failed requests
-- KEYS[5]  idle:<pool>        HASH  idle workers of the worker's pool (touched only
--                                   with ARGV[4])
-- KEYS[6]  offers:<pool>      ZSET  workers whose offer found no idle worker (likewise)
-- then 4 per result, in the order of the groups of ARGV:
--          res:<id> STRING, wt:<id> SET, st:<id> HASH, call:<id> HASH
-- ARGV[1]  worker id
-- ARGV[2]  inline limit: results up to this size travel inside the wake-up message
-- ARGV[3]  stem of inbox keys (Keys.inbox(''))
-- ARGV[4]  '1': the worker has nothing else to run after these and waits for work
--          (its blocking take is outstanding): it is marked in KEYS[5] as taking
--          hand-offs and wakes the latest offerer of KEYS[6], as take does, saving it
--          a take of its own; '0': not
-- ARGV[5]  the message that tells a worker to offer its surplus now
-- ARGV[6]  the inbox of a process that has these results already ('' for none): the
--          completing worker, which resolved its own waiters before sending them; a
--          message there would only be read and dropped
-- then groups of 5: id, encoded result, TTL seconds (0: none), time the run started,
--          one-line summary of the result or error.  An empty result: the caller
--          stored it under res:<id> itself (a large one, sent as a plain SET rather
--          than copied through the arguments of this script).
-- Derived keys: the inboxes to wake are the members of wt:<id>, which submit stored
-- as the waiters' inbox keys (Keys.inbox(process)): they carry the namespace's hash
-- tag, so they share the slot of KEYS.  A member that does not start with the inbox
-- stem ARGV[3] is no inbox of this namespace and is skipped.
-- Stores each result, pushes a completion message to every waiting inbox, and drops
-- the request's pending state, all in one step: no waiter can miss it.
-- Bounded: a worker sends at most 64 results per call, and a request's waiters are
-- inboxes, one per process that waits for it (a grid's processes, not its calls).
-- Returns the number of results stored.
local owned, inflight, stats, failures = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local idle, offers = KEYS[5], KEYS[6]
local worker, inline, inbox_stem = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local resolved = ARGV[6]
if #KEYS - 6 ~= 4 * (#ARGV - 6) / 5 then
  return redis.error_reply('ERR pygirder complete: ' .. (#KEYS - 6) .. ' keys for '
                           .. ((#ARGV - 6) / 5) .. ' results; expected 4 per result')
end
local now = redis.call('TIME')
local t = now[1] + now[2] / 1e6
local done, failed = 0, 0
for i = 7, #ARGV, 5 do
  local id, result, ttl = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local k = 6 + 4 * (i - 7) / 5
  local res, wt, st, c = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
  if redis.call('EXISTS', c) == 1 then
    local state = 'done'
    if string.sub(result, 1, 1) == 'E' then
      state = 'failed'
      failed = failed + 1
      redis.call('LPUSH', failures, id)
      redis.call('LTRIM', failures, 0, 199)
    end
    redis.call('HSET', c, 'state', state, 'worker', worker, 'started', ARGV[i + 3],
               'finished', t, 'summary', ARGV[i + 4])
  end
  if result == '' then
    result = false
  elseif ttl > 0 then
    redis.call('SET', res, result, 'EX', ttl)
  else
    redis.call('SET', res, result)
  end
  local msg
  if result and #result <= inline then msg = '1' .. id .. result else msg = '0' .. id end
  for _, box in ipairs(redis.call('SMEMBERS', wt)) do
    if box ~= resolved and string.sub(box, 1, #inbox_stem) == inbox_stem then
      redis.call('LPUSH', box, msg)
      redis.call('EXPIRE', box, INBOX_TTL)
    end
  end
  redis.call('DEL', wt, st)
  redis.call('SREM', owned, id)
  redis.call('LREM', inflight, 1, id)
  done = done + 1
end
redis.call('HINCRBY', stats, 'executed', done)
if ARGV[4] == '1' then
  redis.call('HSET', idle, worker, 'h' .. now[1] .. '.' .. string.format('%06d', now[2]))
  redis.call('ZREM', offers, worker)
  local latest = redis.call('ZPOPMAX', offers)
  if #latest > 0 then
    local box = inbox_stem .. latest[1]
    redis.call('LPUSH', box, ARGV[5])
    redis.call('EXPIRE', box, INBOX_TTL)
  end
end
if failed > 0 then redis.call('HINCRBY', stats, 'failed', failed) end
return done
