#!lua
-- requeue: hand a worker's requests back to their pool queues (local or running ->
-- queued), on graceful shutdown and when the reaper finds the worker dead.
--
-- KEYS[1]  owned:<worker>     SET     the worker's local requests
-- KEYS[2]  inflight:<worker>  LIST    what the worker took and has not finished
-- KEYS[3]  cur:<worker>       STRING  the request holding its baton when it died
-- KEYS[4]  stats              HASH    grid-wide counters
-- then 2 per id of ARGV, in order: st:<id> HASH, res:<id> STRING
-- ARGV[1]  worker id
-- ARGV[2]  dead: '1' when the worker died, '0' when it hands work back
-- ARGV[3]  max attempts (a request that killed this many workers is poison)
-- ARGV[4]  stem of st:<id> keys, ARGV[5] of res:<id>, ARGV[6] of q:<pool>
-- then ids (at most REQUEUE_PAGE; none: the next page of the worker's owned set, or
--          once that is empty of its in-flight list)
-- Derived keys: st:<id> and res:<id> of the ids popped from KEYS[1] and KEYS[2], and
-- q:<pool> of the pool read from st:<id>, are the stems ARGV[4..6] (Keys.state(''),
-- ...) followed by the id or pool: the stems carry the namespace's hash tag, so these
-- keys share the slot of KEYS.
-- Finished requests are only dropped from the lists.  A queued request in the in-flight
-- list was moved there by the worker's blocking move and never claimed (the worker
-- died, or stopped, first): it goes back to its queue as it is (it never ran).  A
-- queued one that is only in the owned set is in a queue already and is skipped.
-- When the worker died, every request it held becomes a suspect (field d counts those
-- deaths).  A suspect runs "carefully": its worker records it in cur:<worker> while it
-- holds the baton (so does a worker whose event loop is torn down, for the request
-- holding the baton then).  A death while cur names the request is a strike.  Deaths
-- it caused are its strikes plus at most one unattributed death (the one that made it
-- a suspect); at a strike that brings them to max attempts it is not requeued: its id
-- is returned and the caller fails it as a poison request.
-- Without ids, each entry is popped from the owned set or the in-flight list as it is
-- handled, so every request is handled once however many calls it takes: one that is
-- in both leaves both at its first entry (the owned set's).  cur:<worker> is kept until the
-- last page, so a strike counts on whichever page meets its request.
-- Returns {number requeued, entries left (0: done), poisoned id, ...}.
local owned, inflight, cur, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local worker, dead, max_attempts = ARGV[1], ARGV[2] == '1', tonumber(ARGV[3])
local st_stem, res_stem, q_stem = ARGV[4], ARGV[5], ARGV[6]
if #ARGV - 6 > REQUEUE_PAGE then
  return redis.error_reply('ERR pygirder requeue: at most ' .. REQUEUE_PAGE
                           .. ' ids per call, got ' .. (#ARGV - 6) .. '; send them in chunks')
end
if #KEYS - 4 ~= 2 * (#ARGV - 6) then
  return redis.error_reply('ERR pygirder requeue: ' .. (#KEYS - 4) .. ' keys for '
                           .. (#ARGV - 6) .. ' ids; expected 2 per id')
end
local current = false
if dead then current = redis.call('GET', cur) end
local ids, sts, results = {}, {}, {}
local listed = {}  -- ids popped off the in-flight list (by position)
local explicit = #ARGV > 6
if explicit then
  for i = 7, #ARGV do
    ids[#ids + 1] = ARGV[i]
    sts[#ids] = KEYS[4 + 2 * (i - 7) + 1]
    results[#ids] = KEYS[4 + 2 * (i - 7) + 2]
  end
else
  ids = redis.call('SPOP', owned, REQUEUE_PAGE)
  if #ids < REQUEUE_PAGE then
    local more = redis.call('LPOP', inflight, REQUEUE_PAGE - #ids)
    if more then
      for _, id in ipairs(more) do
        ids[#ids + 1] = id
        listed[#ids] = true
      end
    end
  end
  for n, id in ipairs(ids) do
    sts[n] = st_stem .. id
    results[n] = res_stem .. id
  end
end
local moved = 0
local out = {0, 0}
local seen = {}
for n, id in ipairs(ids) do
  if not seen[id] then
    seen[id] = true
    local st = sts[n]
    local pool = redis.call('HGET', st, 'pool')
    local owner = redis.call('HGET', st, 'o')
    local poisoned = false
    local state = redis.call('HGET', st, 's')
    if explicit and state == 'queued' then
      listed[n] = redis.call('LREM', inflight, 0, id) > 0
    end
    if pool and state == 'queued' and listed[n] and redis.call('EXISTS', results[n]) == 0 then
      -- moved off its queue by a blocking move and never claimed: back it goes (should
      -- it still have an entry there too, take drops the second one as stale)
      redis.call('RPUSH', q_stem .. pool, id)
      moved = moved + 1
    elseif pool and (owner == worker or owner == false)
        and redis.call('EXISTS', results[n]) == 0
        and state ~= 'queued' then
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
        redis.call('RPUSH', q_stem .. pool, id)
        moved = moved + 1
      end
    end
    redis.call('SREM', owned, id)
    -- an explicit id may sit anywhere in the in-flight list (short: what the worker
    -- took); a popped one is looked for only when it came from the owned set, so it
    -- is met once
    if explicit or not listed[n] then redis.call('LREM', inflight, 0, id) end
  end
end
out[1] = moved
local left = 0
if not explicit then left = redis.call('SCARD', owned) + redis.call('LLEN', inflight) end
out[2] = left
if dead and left == 0 then redis.call('DEL', cur) end
if moved > 0 then redis.call('HINCRBY', stats, 'requeued', moved) end
return out
