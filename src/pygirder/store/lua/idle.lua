#!lua
-- idle: mark a worker idle, and wake the worker that last offered work nobody took.
--
-- KEYS[1]  idle:<pool>    HASH  idle workers of the pool
-- KEYS[2]  offers:<pool>  ZSET  workers whose offer found no idle worker (share.lua)
-- ARGV[1]  worker id
-- ARGV[2]  time it became idle (epoch seconds)
-- ARGV[3]  stem of inbox keys (Keys.inbox(''))
-- ARGV[4]  the message that tells a worker to offer its surplus now
-- Derived keys: the inbox of the woken worker is the stem ARGV[3] followed by its id:
-- the stem carries the namespace's hash tag, so it shares the slot of KEYS.
-- A busy worker offers its surplus on a period that backs off while nobody takes it;
-- this wakes the latest offerer instead, so a worker that runs dry gets work in a few
-- round trips however long the period has grown.  One offerer per idle worker: it
-- offers part of its stack, and what is left of its surplus it offers again on its
-- next tick (recording itself again if nobody is idle by then).
-- Returns the id of the worker woken, or false.
local idle, offers = KEYS[1], KEYS[2]
local worker, now, inbox_stem, message = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
redis.call('HSET', idle, worker, now)
redis.call('ZREM', offers, worker)
local latest = redis.call('ZPOPMAX', offers)
if #latest == 0 then return false end
local box = inbox_stem .. latest[1]
redis.call('LPUSH', box, message)
redis.call('EXPIRE', box, INBOX_TTL)
return latest[1]
