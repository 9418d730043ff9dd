#!lua
-- submit: submit-or-subscribe a batch of calls (new -> local or queued).
--
-- KEYS[1]  stats            HASH  grid-wide counters
-- KEYS[2]  kids:<parent>    SET   children of the parent call (touched only with a
--                                 parent and a call graph)
-- KEYS[3]  owned:<owner>    SET   the owner's local requests (touched only for mode 'l')
-- KEYS[4]  waits:<process>  SET   what a client waits for (touched only with ARGV[5])
-- KEYS[5]  wprocs           SET   clients that have a waits set (same)
-- then 5 per call, in the order of ARGV[6]:
--          res:<id> STRING, wt:<id> SET, st:<id> HASH, call:<id> HASH, q:<pool> LIST
-- ARGV[1]  inbox key of the submitting process ('' for none): stored in wt:<id>
-- ARGV[2]  owner: worker id, '' for a client
-- ARGV[3]  parent request id, '' for top-level calls
-- ARGV[4]  call-graph TTL in seconds (0: no call graph)
-- ARGV[5]  process id to record in waits and wprocs ('' for none: workers' calls)
-- ARGV[6]  one msgpack array (packed by the client: cheaper than thousands of ARGV
--          entries) of groups of 6: id, payload, pool, mode ('l' local stack of the
--          owner, 'q' pool queue), function, args summary
-- ARGV[7]  stem of idle:<pool> keys, ARGV[8] of inflight:<worker>, ARGV[9] of
--          inbox:<worker>, ARGV[10] of hb:<worker>
-- ARGV[11] hand-off limit: a new queued call whose payload is at most this many bytes
--          goes straight to an idle worker (0: never)
-- Derived keys: idle:<pool> of each queued call's pool, and inflight:, inbox: and hb:
-- of the idle worker it is handed to, are the stems ARGV[7..10] followed by the pool
-- or worker id: the stems carry the namespace's hash tag, so these keys share the
-- slot of KEYS.
-- Hand-off: a worker waiting for work marks itself in idle:<pool> with 'h' and the
-- time; a new queued call then skips the queue: it is claimed for one such worker
-- (running, in its in-flight list, as take would) and its payload pushed to that
-- worker's inbox as '2' .. id .. payload, so the worker runs it without another round
-- trip.  Only a mark younger than HANDOFF_FRESH seconds of a worker with a heartbeat
-- counts (an idle worker renews it every second); the mark is removed, so each idle
-- worker gets one call and the rest of a batch goes to the queue.  Other marks
-- (distributors standing in for a pool) only see the queue, as before.
-- Returns per call: the stored result (bulk) if done, 0 if already pending, 1 if new.
-- What a client waits for is recorded in waits:<process> (and the process in wprocs),
-- so the reaper can withdraw a client that dies while waiting.  A dead worker's
-- requests are requeued instead (requeue), and their re-runs wait again for what they
-- need.
local stats, kids, owned, waits, wprocs = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local inbox, owner, parent = ARGV[1], ARGV[2], ARGV[3]
local graph_ttl = tonumber(ARGV[4])
local waiter = ARGV[5]
local items = cmsgpack.unpack(ARGV[6])
local idle_stem, inflight_stem, inbox_stem, hb_stem = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local handoff_limit = tonumber(ARGV[11] or '0')
if #KEYS ~= 5 + 5 * (#items / 6) then
  return redis.error_reply('ERR pygirder submit: ' .. #KEYS .. ' keys for ' .. (#items / 6)
                           .. ' calls; expected 5 and 5 per call')
end
local now = redis.call('TIME')
local t = now[1] + now[2] / 1e6
local out = {}
local new, cached, shared = 0, 0, 0
local waiting, handed = 0, 0
local no_idle = {}  -- pools found without a worker to hand to, in this call
-- An idle worker of the pool that takes hand-offs (its mark is removed), or nil.
local function idle_worker(pool)
  if no_idle[pool] then return nil end
  local idle = idle_stem .. pool
  local marks = redis.call('HRANDFIELD', idle, 4, 'WITHVALUES')
  for j = 1, #marks, 2 do
    local w, mark = marks[j], marks[j + 1]
    local since = string.sub(mark, 1, 1) == 'h' and tonumber(string.sub(mark, 2))
    if since and t - since < HANDOFF_FRESH and redis.call('EXISTS', hb_stem .. w) == 1 then
      redis.call('HDEL', idle, w)
      return w
    end
  end
  no_idle[pool] = true
  return nil
end
for i = 1, #items, 6 do
  local id, payload, pool, mode = items[i], items[i + 1], items[i + 2], items[i + 3]
  local k = 5 + 5 * (i - 1) / 6
  local res, wt, st, c, q = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5]
  if graph_ttl > 0 and parent ~= '' then redis.call('SADD', kids, id) end
  local r = redis.call('GET', res)
  if r then
    out[#out + 1] = r
    cached = cached + 1
  else
    if inbox ~= '' then redis.call('SADD', wt, inbox) end
    if waiter ~= '' then
      redis.call('SADD', waits, id)
      waiting = waiting + 1
    end
    local state = redis.call('HGET', st, 's')
    local taker
    if state == 'local' and owner ~= '' and redis.call('HGET', st, 'o') == owner then
      out[#out + 1] = 1  -- ours already: a retried submit whose first reply was lost
    elseif state then
      out[#out + 1] = 0
      shared = shared + 1
    else
      if mode == 'l' then
        redis.call('HSET', st, 'p', payload, 's', 'local', 'o', owner, 'pool', pool)
        redis.call('SADD', owned, id)
      else
        local w
        if #payload <= handoff_limit then w = idle_worker(pool) end
        if w then
          redis.call('HSET', st, 'p', payload, 's', 'running', 'pool', pool, 'o', w, 'n', 1)
          redis.call('LPUSH', inflight_stem .. w, id)
          local box = inbox_stem .. w
          redis.call('LPUSH', box, '2' .. id .. payload)
          redis.call('EXPIRE', box, INBOX_TTL)
          handed = handed + 1
          taker = w
        else
          redis.call('HSET', st, 'p', payload, 's', 'queued', 'pool', pool)
          redis.call('LPUSH', q, id)
        end
      end
      out[#out + 1] = 1
      new = new + 1
      if graph_ttl > 0 then
        local record = 'queued'
        if mode == 'l' then record = 'local' elseif taker then record = 'taken' end
        redis.call('HSET', c, 'fn', items[i + 4], 'args', items[i + 5], 'parent', parent,
                   'pool', pool, 'state', record, 'submitted', t)
        if taker then redis.call('HSET', c, 'worker', taker) end
        redis.call('EXPIRE', c, graph_ttl)
      end
    end
  end
end
if graph_ttl > 0 and parent ~= '' and #items > 0 then redis.call('EXPIRE', kids, graph_ttl) end
if new > 0 then redis.call('HINCRBY', stats, 'submitted', new) end
if cached > 0 then redis.call('HINCRBY', stats, 'cached', cached) end
if shared > 0 then redis.call('HINCRBY', stats, 'shared', shared) end
if handed > 0 then redis.call('HINCRBY', stats, 'handed', handed) end
if waiting > 0 then
  redis.call('EXPIRE', waits, INBOX_TTL)
  redis.call('SADD', wprocs, waiter)
end
return out
