"""Recovery: the work of dead workers goes back to its queues, poison is failed.

A worker that dies costs only a re-run: its heartbeat lapses, and one live worker at
a time (a lock with a TTL) hands back everything the dead one owned or had in
flight.  A request that was running each time its worker died is failed as poison
after ``PYGIRDER_MAX_ATTEMPTS`` instead of being handed back for ever.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ...errors import CallLink, RemoteError
from ...store import scripts
from ..protocol import encode_error
from ..runtime import Runtime

log = logging.getLogger("pygirder.worker")


class Recovery:
    """Requeues, reaps and fails poison on behalf of the worker ``worker_id``."""

    def __init__(self, runtime: Runtime, *, worker_id: str, pool: str, error_ttl: int) -> None:
        self.runtime = runtime
        self.worker_id = worker_id
        self.pool = pool
        self.error_ttl = error_ttl

    async def requeue_strays(self, known: Callable[[], set[bytes] | None]) -> None:
        """Hand back in-flight entries the worker does not know about (a take whose
        reply was lost).  ``known`` gives the ids it holds, or None while a take is
        under way (its entries are in flight but not known yet)."""
        if known() is None:
            return
        assert self.runtime.redis is not None
        listed = await self.runtime.redis.lrange(self.runtime.keys.inflight(self.worker_id), 0, -1)
        held = known()
        if held is None:
            return
        strays = [i for i in listed if i not in held]
        if strays:
            await self.requeue_ids(strays)

    async def reap_loop(self) -> None:
        """One worker at a time (a lock with a TTL) requeues the work of dead workers."""
        assert self.runtime.redis is not None
        redis = self.runtime.redis
        lock = self.runtime.keys.reaper_lock
        every = self.runtime.liveness.reap_every
        while True:
            await asyncio.sleep(every)
            try:
                got = await redis.set(lock, self.worker_id, nx=True, px=int(every * 3000))
                if not got:
                    holder = await redis.get(lock)
                    if holder != self.worker_id.encode():
                        continue
                    await redis.pexpire(lock, int(every * 3000))
                await self.reap()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reaping failed: %s", exc)

    async def reap(self) -> list[str]:
        """Requeue the requests of every registered worker whose heartbeat has expired,
        then withdraw every dead client from what it waited for."""
        assert self.runtime.redis is not None
        dead = await self.reap_workers()
        await self.runtime.reap_waiters()
        return dead

    async def reap_workers(self) -> list[str]:
        assert self.runtime.redis is not None
        redis = self.runtime.redis
        keys = self.runtime.keys
        workers = await redis.hgetall(keys.workers)
        if not workers:
            return []
        ids = [w.decode() for w in workers]
        async with redis.pipeline(transaction=False) as pipe:
            for worker_id in ids:
                pipe.exists(keys.heartbeat(worker_id))
            alive = await pipe.execute()
        dead = [w for w, a in zip(ids, alive, strict=True) if not a and w != self.worker_id]
        for worker_id in dead:
            await self.retire(worker_id, json.loads(workers[worker_id.encode()]))
        return dead

    async def retire(self, worker_id: str, info: dict[str, Any]) -> None:
        """Requeue a dead worker's requests, fail its poison requests, unregister it.
        ``info`` is its entry in the worker table.  The reaper calls this when the
        heartbeat lapsed; a supervisor as soon as it reaped the process."""
        assert self.runtime.redis is not None
        keys = self.runtime.keys
        # first its idle marks: a submit must hand it nothing once its requests are back
        async with self.runtime.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(keys.idle(info.get("pool", self.pool)), worker_id)
            pipe.zrem(keys.offers(info.get("pool", self.pool)), worker_id)
            if info.get("parent"):  # a distributor also stood in for its parent pool
                pipe.hdel(keys.idle(info["parent"]), worker_id)
            pipe.delete(keys.heartbeat(worker_id))
            await pipe.execute()
        requeued, poisoned = await self.requeue_all(worker_id, dead=True)
        for request_id in poisoned:
            await self.fail_poison(request_id, worker_id)
        async with self.runtime.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(keys.workers, worker_id)
            pipe.hincrby(keys.stats, "dead_workers", 1)
            await pipe.execute()
        log.warning("worker %s is dead: requeued %d requests, failed %d poison requests",
                    worker_id, requeued, len(poisoned))  # fmt: skip

    async def requeue_ids(self, ids: list[str] | list[bytes]) -> None:
        """Hand these requests back to their pools, a bounded chunk per script call."""
        for start in range(0, len(ids), scripts.REQUEUE_PAGE):
            chunk = ids[start : start + scripts.REQUEUE_PAGE]
            await scripts.requeue(self.runtime, self.runtime.keys, chunk, worker=self.worker_id)

    async def requeue_all(self, worker_id: str, *, dead: bool) -> tuple[int, list[str]]:
        """Hand back everything a worker owns or has in flight, a bounded page per
        script call (a dead worker's stack may hold 100,000 entries).  Returns how many
        were requeued and the poison requests the caller must fail."""
        attempts = self.runtime.liveness.max_attempts if dead else 0
        requeued, poisoned, left = 0, [], 1
        while left:
            reply = await scripts.requeue(
                self.runtime, self.runtime.keys, worker=worker_id, dead=dead, max_attempts=attempts
            )
            requeued, left = requeued + reply[0], reply[1]
            poisoned += [p.decode() for p in reply[2:]]
        return requeued, poisoned

    async def fail_poison(self, request_id: str, worker_id: str) -> None:
        assert self.runtime.redis is not None
        keys = self.runtime.keys
        fn = await self.runtime.redis.hget(keys.call(request_id), "fn")
        name = fn.decode() if fn else "?"
        attempts = self.runtime.liveness.max_attempts
        error = RemoteError(
            "pygirder.PoisonRequest",
            f"{name} was started {attempts} times and its worker died each time (last: "
            f"{worker_id}); it is failed instead of retried. Look for a crash, an abort or "
            "memory exhaustion in it; raise PYGIRDER_MAX_ATTEMPTS if workers die for other "
            "reasons",
            "",
            [CallLink(request_id, name)],
        )
        poison = scripts.Completion(request_id, encode_error(error), self.error_ttl, time.time(),
                                    f"PoisonRequest: killed {attempts} workers")  # fmt: skip
        await scripts.complete(self.runtime, keys, [poison], worker=worker_id)

    async def hand_back_after_crash(
        self, holder: str | None, flush: Callable[[], Awaitable[None]]
    ) -> None:
        """The event loop is being torn down by an error outside any call's own code.

        What finished is stored (``flush``); everything else is handed back as the
        reaper would for a dead worker, with the request that held the baton
        (``holder``) blamed: a request that ends its worker this way each time is
        failed as poison after PYGIRDER_MAX_ATTEMPTS, instead of being handed back for
        ever.
        """
        redis = self.runtime.redis
        assert redis is not None
        keys = self.runtime.keys
        log.error("worker %s is going down abnormally (holding %s); handing back its work",
                  self.worker_id, holder)  # fmt: skip
        await flush()
        if holder is not None:
            await redis.set(keys.current(self.worker_id), holder)
        _, poisoned = await self.requeue_all(self.worker_id, dead=True)
        for request_id in poisoned:
            await self.fail_poison(request_id, self.worker_id)
        async with redis.pipeline(transaction=False) as pipe:
            pipe.hdel(keys.idle(self.pool), self.worker_id)
            pipe.hdel(keys.workers, self.worker_id)
            pipe.hincrby(keys.stats, "dead_workers", 1)
            await pipe.execute()
