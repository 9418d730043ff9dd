"""Server-side scripts: every state transition of a request is one atomic Lua script.

A request moves  new -> local (on a worker's stack) or queued (in a pool queue)
-> running (claimed by a worker) -> done (result stored, waiters notified).  Each
arrow is one script below, so two processes can never both claim, both complete, or
miss each other's wake-ups: the server serialises scripts.

Keys are built inside the scripts from the namespace prefix passed as ARGV[1]; they
all share one hash tag, so they live in one slot (see keys.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from .keys import INBOX_TTL_S

# Result messages pushed to inboxes are "<flag><id><result?>": flag "1" means the
# encoded result follows inline (small results, saving the waiter a GET), "0" means
# the waiter fetches res:<id>.
INLINE_RESULT_LIMIT = 16 * 1024

# Calls per SUBMIT call: the client sends longer lists in chunks of this size, so one
# call stays a few milliseconds of server time.
SUBMIT_CHUNK = 512

SUBMIT = """
-- ARGV: prefix, inbox key ('' for none), owner (worker id or ''), parent request id
--       ('' for top-level calls), call-graph TTL (0: no call graph), then one msgpack
--       array (packed by the client: cheaper than thousands of ARGV entries) of groups
--       of 6: id, payload, pool, mode ('l' local stack of owner, 'q' pool queue),
--       function, args summary
-- Returns per request: the stored result (bulk) if done, 0 if already pending, 1 if new.
-- What a client (a submitter that is no worker: owner '') waits for is also recorded in
-- waits:<process> (and the process in wprocs), so the reaper can withdraw a client that
-- dies while waiting.  A dead worker's requests are requeued instead (REQUEUE), and
-- their re-runs wait again for what they need.
local p, inbox, owner, parent = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local graph_ttl = tonumber(ARGV[5])
local items = cmsgpack.unpack(ARGV[6])
local now = redis.call('TIME')
local t = now[1] + now[2] / 1e6
local out = {}
local new, cached, shared = 0, 0, 0
local waiter, waits = false, false
if inbox ~= '' and owner == '' and string.sub(inbox, 1, #p + 6) == p .. 'inbox:' then
  waiter = string.sub(inbox, #p + 7)
  waits = p .. 'waits:' .. waiter
end
local waiting = 0
for i = 1, #items, 6 do
  local id, payload, pool, mode = items[i], items[i + 1], items[i + 2], items[i + 3]
  if graph_ttl > 0 and parent ~= '' then
    local kids = p .. 'kids:' .. parent
    redis.call('SADD', kids, id)
    redis.call('EXPIRE', kids, graph_ttl)
  end
  local r = redis.call('GET', p .. 'res:' .. id)
  if r then
    out[#out + 1] = r
    cached = cached + 1
  else
    if inbox ~= '' then redis.call('SADD', p .. 'wt:' .. id, inbox) end
    if waits then
      redis.call('SADD', waits, id)
      waiting = waiting + 1
    end
    local st = p .. 'st:' .. id
    local state = redis.call('HGET', st, 's')
    if state == 'local' and owner ~= '' and redis.call('HGET', st, 'o') == owner then
      out[#out + 1] = 1  -- ours already: a retried submit whose first reply was lost
    elseif state then
      out[#out + 1] = 0
      shared = shared + 1
    else
      if mode == 'l' then
        redis.call('HSET', st, 'p', payload, 's', 'local', 'o', owner, 'pool', pool)
        redis.call('SADD', p .. 'owned:' .. owner, id)
      else
        redis.call('HSET', st, 'p', payload, 's', 'queued', 'pool', pool)
        redis.call('LPUSH', p .. 'q:' .. pool, id)
      end
      out[#out + 1] = 1
      new = new + 1
      if graph_ttl > 0 then
        local c = p .. 'call:' .. id
        local state = 'queued'
        if mode == 'l' then state = 'local' end
        redis.call('HSET', c, 'fn', items[i + 4], 'args', items[i + 5], 'parent', parent,
                   'pool', pool, 'state', state, 'submitted', t)
        redis.call('EXPIRE', c, graph_ttl)
      end
    end
  end
end
local stats = p .. 'stats'
if new > 0 then redis.call('HINCRBY', stats, 'submitted', new) end
if cached > 0 then redis.call('HINCRBY', stats, 'cached', cached) end
if shared > 0 then redis.call('HINCRBY', stats, 'shared', shared) end
if waiting > 0 then
  redis.call('EXPIRE', waits, INBOX_TTL)
  redis.call('SADD', p .. 'wprocs', waiter)
end
return out
""".replace("INBOX_TTL", str(INBOX_TTL_S))

TAKE = """
-- ARGV: prefix, pool, worker, max, [id already moved into inflight by BLMOVE]
-- Claims up to max requests of the pool queue for the worker (moving them to its
-- in-flight list) and returns {id1, payload1, deaths1, id2, ...}; deaths counts the
-- workers that died while holding the request.  Only a request in state 'queued' is
-- claimed; any other entry is stale and dropped on the way: the request finished, is
-- unknown, was cancelled (CANCEL leaves its entry here), or another entry of it was
-- claimed already (a request submitted again after a cancel has two entries).  At most
-- 4 * max + DROP_BUDGET entries are looked at per call, so a queue full of stale
-- entries is drained a bounded step at a time.
local p, pool, worker, max = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local q, inflight = p .. 'q:' .. pool, p .. 'inflight:' .. worker
local out = {}
local dropped = 0
local function claim(id)
  local st = p .. 'st:' .. id
  local fields = redis.call('HMGET', st, 's', 'p')
  local payload = fields[2]
  if fields[1] == 'queued' and payload and redis.call('EXISTS', p .. 'res:' .. id) == 0 then
    redis.call('HSET', st, 's', 'running', 'o', worker)
    redis.call('HINCRBY', st, 'n', 1)
    local suspect = redis.call('HGET', st, 'd')
    local c = p .. 'call:' .. id
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
if ARGV[5] then claim(ARGV[5]) end
-- Take a fair share only: with a short queue and idle peers, one worker must not
-- swallow everything (each idle peer and this worker get an equal part).
local idle = p .. 'idle:' .. pool
local peers = redis.call('HLEN', idle) - redis.call('HEXISTS', idle, worker)
local share = math.floor(redis.call('LLEN', q) / (peers + 1))
if share < max then max = math.max(1, share) end
local tries = 0
while #out < 3 * max and tries < 4 * max + DROP_BUDGET do
  tries = tries + 1
  local id = redis.call('LMOVE', q, inflight, 'RIGHT', 'LEFT')
  if not id then break end
  claim(id)
end
if #out > 0 then redis.call('HDEL', p .. 'idle:' .. pool, worker) end
if dropped > 0 then
  -- stale: entries CANCEL left in queues that no take has dropped yet.  Every dropped
  -- entry counts against it, down to 0 (an entry left behind otherwise, e.g. by a
  -- request that finished while queued, makes it undercount, never go negative).
  local stats = p .. 'stats'
  local stale = tonumber(redis.call('HGET', stats, 'stale') or '0')
  if stale > 0 then redis.call('HINCRBY', stats, 'stale', -math.min(stale, dropped)) end
  redis.call('HINCRBY', stats, 'dropped', dropped)
end
return out
""".replace("DROP_BUDGET", "256")

COMPLETE = """
-- ARGV: prefix, worker, inline limit, then groups of 5: id, encoded result, ttl seconds
--       (0: none), time the run started, one-line summary of the result or error.
--       An empty result: the caller stored it under res:<id> itself (a large one,
--       sent as a plain SET rather than copied through the script's arguments).
-- Stores each result, pushes a completion message to every waiting inbox, and drops
-- the request's pending state, all in one step: no waiter can miss it.
-- Bounded: a worker sends at most 64 results per call, and a request's waiters are
-- inboxes, one per process that waits for it (a grid's processes, not its calls).
local p, worker, inline = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now = redis.call('TIME')
local t = now[1] + now[2] / 1e6
local done, failed = 0, 0
for i = 4, #ARGV, 5 do
  local id, result, ttl = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local c = p .. 'call:' .. id
  if redis.call('EXISTS', c) == 1 then
    local state = 'done'
    if string.sub(result, 1, 1) == 'E' then
      state = 'failed'
      failed = failed + 1
      redis.call('LPUSH', p .. 'failures', id)
      redis.call('LTRIM', p .. 'failures', 0, 199)
    end
    redis.call('HSET', c, 'state', state, 'worker', worker, 'started', ARGV[i + 3],
               'finished', t, 'summary', ARGV[i + 4])
  end
  if result == '' then
    result = false
  elseif ttl > 0 then
    redis.call('SET', p .. 'res:' .. id, result, 'EX', ttl)
  else
    redis.call('SET', p .. 'res:' .. id, result)
  end
  local msg
  if result and #result <= inline then msg = '1' .. id .. result else msg = '0' .. id end
  local wt = p .. 'wt:' .. id
  for _, box in ipairs(redis.call('SMEMBERS', wt)) do
    redis.call('LPUSH', box, msg)
    redis.call('EXPIRE', box, INBOX_TTL)
  end
  redis.call('DEL', wt, p .. 'st:' .. id)
  redis.call('SREM', p .. 'owned:' .. worker, id)
  redis.call('LREM', p .. 'inflight:' .. worker, 1, id)
  done = done + 1
end
redis.call('HINCRBY', p .. 'stats', 'executed', done)
if failed > 0 then redis.call('HINCRBY', p .. 'stats', 'failed', failed) end
return done
""".replace("INBOX_TTL", str(INBOX_TTL_S))

# Ids per SHARE call: a worker offers at most this many at a time, and one over its
# max_stack sends its surplus in chunks of this size.
SHARE_CHUNK = 512

SHARE = """
-- ARGV: prefix, pool, worker, force ('1': move them all), then candidate ids (bottom
--       of the worker's stack first)
-- While some worker of the pool is idle and the queue is shorter than the offer, moves
-- the candidates from the worker's stack to the pool queue.  Returns the ids it moved.
local p, pool, worker, force = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local q = p .. 'q:' .. pool
local want = 0
if force == '1' then
  want = #ARGV - 4
elseif redis.call('HLEN', p .. 'idle:' .. pool) > 0 then
  want = #ARGV - 4 - redis.call('LLEN', q)
end
local out = {}
local i = 5
while want > 0 and i <= #ARGV do
  local id = ARGV[i]
  local st = p .. 'st:' .. id
  if redis.call('HGET', st, 's') == 'local' and redis.call('HGET', st, 'o') == worker then
    redis.call('HSET', st, 's', 'queued')
    redis.call('HDEL', st, 'o')
    redis.call('SREM', p .. 'owned:' .. worker, id)
    redis.call('LPUSH', q, id)
    out[#out + 1] = id
    want = want - 1
  end
  i = i + 1
end
if #out > 0 then redis.call('HINCRBY', p .. 'stats', 'moved_to_pool', #out) end
return out
"""

# Ids per REQUEUE call: explicit lists are sent in chunks of this size, and a call
# without ids hands back at most this many of the worker's entries (the caller repeats
# it until the script says nothing is left), so one call stays a few milliseconds.
REQUEUE_PAGE = 512

REQUEUE = """
-- ARGV: prefix, worker, dead ('1' when the worker died, '0' when it hands work back),
--       max attempts, then ids (at most REQUEUE_PAGE; none: the next page of the
--       worker's owned set, or once that is empty of its in-flight list)
-- Hands requests back to their pool queues.  Used on graceful shutdown and by the
-- reaper.  Finished requests are only dropped from the lists.
-- When the worker died, every request it held becomes a suspect (field d counts those
-- deaths).  A suspect runs "carefully": its worker records it in cur:<worker> while it
-- holds the baton (so does a worker whose event loop is torn down, for the request
-- holding the baton then).  A death while cur names the request is a strike.  Deaths
-- it caused are its strikes plus at most one unattributed death (the one that made it
-- a suspect); at a strike that brings them to max attempts it is not requeued: its id
-- is returned and the caller fails it as a poison request.
-- Without ids, each entry is popped from the owned set or the in-flight list as it is
-- handled, so every request is handled once however many calls it takes: one that is
-- in both is requeued at its first entry and skipped at its second (it is queued by
-- then), and a poisoned one leaves both at once.  cur:<worker> is kept until the
-- last page, so a strike counts on whichever page meets its request.
-- Returns {number requeued, entries left (0: done), poisoned id, ...}.
local p, worker, dead, max_attempts = ARGV[1], ARGV[2], ARGV[3] == '1', tonumber(ARGV[4])
local owned, inflight = p .. 'owned:' .. worker, p .. 'inflight:' .. worker
if #ARGV - 4 > REQUEUE_PAGE then
  return redis.error_reply('ERR pygirder requeue: at most REQUEUE_PAGE ids per call, got '
                           .. (#ARGV - 4) .. '; send them in chunks')
end
local current = false
if dead then current = redis.call('GET', p .. 'cur:' .. worker) end
local ids = {}
local explicit = #ARGV > 4
if explicit then
  for i = 5, #ARGV do ids[#ids + 1] = ARGV[i] end
else
  ids = redis.call('SPOP', owned, REQUEUE_PAGE)
  if #ids < REQUEUE_PAGE then
    local more = redis.call('LPOP', inflight, REQUEUE_PAGE - #ids)
    if more then
      for _, id in ipairs(more) do ids[#ids + 1] = id end
    end
  end
end
local moved = 0
local out = {0, 0}
local seen = {}
for _, id in ipairs(ids) do
  if not seen[id] then
    seen[id] = true
    local st = p .. 'st:' .. id
    local pool = redis.call('HGET', st, 'pool')
    local owner = redis.call('HGET', st, 'o')
    local poisoned = false
    if pool and (owner == worker or owner == false)
        and redis.call('EXISTS', p .. 'res:' .. id) == 0
        and redis.call('HGET', st, 's') ~= 'queued' then
      local strike = dead and id == current
      local killed = 0
      if dead then
        local deaths = redis.call('HINCRBY', st, 'd', 1)
        local strikes = tonumber(redis.call('HGET', st, 'strikes') or '0')
        if strike then strikes = redis.call('HINCRBY', st, 'strikes', 1) end
        killed = strikes + math.min(1, deaths - strikes)
      end
      if strike and killed >= max_attempts then
        out[#out + 1] = id
        poisoned = true
      else
        redis.call('HSET', st, 's', 'queued')
        redis.call('HDEL', st, 'o')
        redis.call('RPUSH', p .. 'q:' .. pool, id)
        moved = moved + 1
      end
    end
    redis.call('SREM', owned, id)
    -- an explicit id may sit anywhere in the in-flight list (short: what the worker
    -- took); a popped one is looked for only when it is poisoned, so it is met once
    if explicit or poisoned then redis.call('LREM', inflight, 0, id) end
  end
end
out[1] = moved
local left = 0
if not explicit then left = redis.call('SCARD', owned) + redis.call('LLEN', inflight) end
out[2] = left
if dead and left == 0 then redis.call('DEL', p .. 'cur:' .. worker) end
if moved > 0 then redis.call('HINCRBY', p .. 'stats', 'requeued', moved) end
return out
""".replace("REQUEUE_PAGE", str(REQUEUE_PAGE))

# Ids per CANCEL call: the client sends longer lists in chunks of this size, so one
# call stays a few milliseconds of server time.
CANCEL_CHUNK = 500

CANCEL = """
-- ARGV: prefix, inbox, ids... (at most CANCEL_CHUNK of them)
-- The process behind inbox no longer waits for these requests.  A request nobody
-- waits for any more and that has not started is cancelled: its state goes (so it can
-- be submitted again) and its call record says 'cancelled'.  Its queue entry stays:
-- removing it here would scan the whole queue once per id; TAKE drops it when it gets
-- there.  The stats field 'stale' counts such entries not yet dropped.
-- Returns the ids that were cancelled.
local p, inbox = ARGV[1], ARGV[2]
if #ARGV - 2 > CANCEL_CHUNK then
  return redis.error_reply('ERR pygirder cancel: at most CANCEL_CHUNK ids per call, got '
                           .. (#ARGV - 2) .. '; send them in chunks')
end
local out = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local wt = p .. 'wt:' .. id
  redis.call('SREM', wt, inbox)
  local st = p .. 'st:' .. id
  if redis.call('SCARD', wt) == 0 and redis.call('HGET', st, 's') == 'queued' then
    redis.call('DEL', st)
    local c = p .. 'call:' .. id
    if redis.call('EXISTS', c) == 1 then redis.call('HSET', c, 'state', 'cancelled') end
    out[#out + 1] = id
  end
end
if #out > 0 then
  redis.call('HINCRBY', p .. 'stats', 'cancelled', #out)
  redis.call('HINCRBY', p .. 'stats', 'stale', #out)
end
return out
""".replace("CANCEL_CHUNK", str(CANCEL_CHUNK))

REACH = """
-- ARGV: prefix, target id, budget (nodes and set members to look at), cursor, then the
--       nodes to expand, in breadth-first order (the first one from cursor: it was cut
--       short)
-- One bounded step of a breadth-first search of the call graph (kids:<id> sets) for
-- target: a request waiting on a call from which it is reachable waits on itself.
-- The client keeps the search (visited nodes, frontier, parents) between steps, so no
-- step looks at much more than budget nodes and members, however many children a
-- node has.
-- Returns {found, expanded, cursor, pending}: found is the index (1-based) of the node
-- whose children include target (0: not found); expanded the number of nodes finished;
-- cursor the SSCAN cursor of the next one ('0': start it afresh); pending the children
-- to expand next, as pairs (child id, index of its parent node).  Children that are
-- finished (a result is stored) or have no children are left out: no cycle runs
-- through them now (a search that ends without a cycle is run again later).
local p, target, budget, cursor = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local looked, expanded = 0, 0
local pending, seen = {}, {}
for i = 5, #ARGV do
  if looked >= budget then break end
  local node = i - 4
  looked = looked + 1  -- a node costs a lookup even when it has no children
  repeat
    local page = redis.call('SSCAN', p .. 'kids:' .. ARGV[i], cursor, 'COUNT',
                            math.max(10, math.min(1000, budget - looked)))
    cursor = page[1]
    for _, kid in ipairs(page[2]) do
      looked = looked + 1
      if kid == target then return {node, expanded, cursor, {}} end
      if not seen[kid] then
        seen[kid] = true
        if redis.call('EXISTS', p .. 'kids:' .. kid) == 1
            and redis.call('EXISTS', p .. 'res:' .. kid) == 0 then
          pending[#pending + 1] = kid
          pending[#pending + 1] = node
        end
      end
    end
  until cursor == '0' or looked >= budget
  if cursor == '0' then expanded = expanded + 1 end
end
return {0, expanded, cursor, pending}
"""


DISTRIBUTE = """
-- ARGV: prefix, child pool, parent pool, distributor id, max moves per tick
-- One tick of a distributor linking a child pool to its parent (Girder's hierarchy):
--  * volunteers down: while the child pool has more idle workers than queued requests,
--    requests move from the parent queue to the child queue;
--  * overflow up: while the parent pool has idle takers (sibling distributors that
--    volunteered) and the child queue holds more than its idle workers can take,
--    requests move from the child queue to the parent queue;
--  * the distributor stands in as an idle worker of the parent pool while its child
--    pool has spare workers, and as an idle worker of the child pool while the parent
--    has spare takers, so workers' sharing and sibling distributors see the capacity.
-- Returns {moved down, moved up}.
local p, child, parent, me, max = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local cq, pq = p .. 'q:' .. child, p .. 'q:' .. parent
local cidle_key, pidle_key = p .. 'idle:' .. child, p .. 'idle:' .. parent
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
if down + up > 0 then redis.call('HINCRBY', p .. 'stats', 'distributed', down + up) end
return {down, up}
"""

WITHDRAW = """
-- ARGV: prefix, client process id, max ids
-- The client has no heartbeat any more (it died): withdraw its inbox from the waiter
-- sets of up to max of the requests it waited for (waits:<process>).  A request that
-- nobody waits for any more and that has not started is cancelled as CANCEL does (its
-- state goes, its queue entry is left for TAKE to drop) and counted as abandoned,
-- unless a worker died holding it (field d): its strikes must be kept until it is
-- failed as poison or finishes.  Once nothing is left, the client and its inbox are
-- forgotten.
-- Returns {ids withdrawn, abandoned, ids left}.
local p, pid, max = ARGV[1], ARGV[2], tonumber(ARGV[3])
if redis.call('EXISTS', p .. 'hb:' .. pid) == 1 then return {0, 0, 0} end  -- alive again
local waits, inbox = p .. 'waits:' .. pid, p .. 'inbox:' .. pid
local ids = redis.call('SPOP', waits, max)
local abandoned = 0
for _, id in ipairs(ids) do
  local wt = p .. 'wt:' .. id
  redis.call('SREM', wt, inbox)
  local st = p .. 'st:' .. id
  if redis.call('SCARD', wt) == 0 and redis.call('HGET', st, 's') == 'queued'
      and not redis.call('HGET', st, 'd') then
    redis.call('DEL', st)
    local c = p .. 'call:' .. id
    if redis.call('EXISTS', c) == 1 then redis.call('HSET', c, 'state', 'cancelled') end
    abandoned = abandoned + 1
  end
end
local left = redis.call('SCARD', waits)
if left == 0 then
  redis.call('SREM', p .. 'wprocs', pid)
  redis.call('DEL', inbox)
end
if abandoned > 0 then
  redis.call('HINCRBY', p .. 'stats', 'abandoned', abandoned)
  redis.call('HINCRBY', p .. 'stats', 'stale', abandoned)
end
return {#ids, abandoned, left}
"""


@dataclass(frozen=True)
class ScriptSource:
    name: str
    source: str


ALL = [
    ScriptSource("submit", SUBMIT),
    ScriptSource("take", TAKE),
    ScriptSource("complete", COMPLETE),
    ScriptSource("share", SHARE),
    ScriptSource("requeue", REQUEUE),
    ScriptSource("cancel", CANCEL),
    ScriptSource("reach", REACH),
    ScriptSource("distribute", DISTRIBUTE),
    ScriptSource("withdraw", WITHDRAW),
]
