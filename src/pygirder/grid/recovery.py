"""Hand a dead worker's requests back to their pools: from the reaper, or at once from
the supervisor that saw the worker process exit.

A worker's requests live in its owned set and its in-flight list on the server.  When
its heartbeat expires, any live worker's reaper requeues them (the backstop for a lost
machine).  A supervisor on the same machine (``pygirder worker --processes N``, the
local workers of ``pygirder.connect()``, the agent on a fleet instance) learns of a
child's death the moment it reaps the process, and requeues that worker's requests
then: the callers' wait is the re-run, not the heartbeat TTL.  Both paths run the same
REQUEUE script (one call per page of 512 requests) and count the death against every
request the worker held, so a request that keeps killing workers is still failed as a
poison request after ``max_attempts``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from .. import settings
from ..errors import CallLink, RemoteError
from ..store import scripts
from ..store.keys import Keys
from ..store.scripts import INLINE_RESULT_LIMIT
from .runtime import connect_redis, encode_error

log = logging.getLogger("pygirder.recovery")

ScriptRunner = Callable[[str, Sequence[Any]], Awaitable[Any]]
ERROR_TTL_S = 300  # seconds the error of a poison request is kept, as a worker keeps errors


async def requeue_all(
    script: ScriptRunner, keys: Keys, worker_id: str, *, dead: bool, max_attempts: int
) -> tuple[int, list[str]]:
    """Hand back everything a worker owns or has in flight, a bounded page per
    script call (a dead worker's stack may hold 100,000 entries).  Returns how many
    were requeued and the poison requests the caller must fail."""
    attempts = max_attempts if dead else 0
    requeued, poisoned, left = 0, [], 1
    while left:
        reply = await script("requeue", [keys.prefix, worker_id, int(dead), attempts])
        requeued, left = requeued + reply[0], reply[1]
        poisoned += [p.decode() for p in reply[2:]]
    return requeued, poisoned


async def fail_poison(
    redis: Any,
    script: ScriptRunner,
    keys: Keys,
    request_id: str,
    worker_id: str,
    *,
    max_attempts: int,
    error_ttl: int = ERROR_TTL_S,
) -> None:
    """Fail a request whose workers died ``max_attempts`` times while running it."""
    fn = await redis.hget(keys.call(request_id), "fn")
    name = fn.decode() if fn else "?"
    error = RemoteError(
        "pygirder.PoisonRequest",
        f"{name} was started {max_attempts} times and its worker died each time (last: "
        f"{worker_id}); it is failed instead of retried. Look for a crash, an abort or "
        "memory exhaustion in it; raise PYGIRDER_MAX_ATTEMPTS if workers die for other "
        "reasons",
        "",
        [CallLink(request_id, name)],
    )
    await script(
        "complete",
        [keys.prefix, worker_id, INLINE_RESULT_LIMIT, request_id, encode_error(error),
         error_ttl, time.time(), f"PoisonRequest: killed {max_attempts} workers"],
    )  # fmt: skip


async def retire_dead_worker(
    redis: Any,
    script: ScriptRunner,
    keys: Keys,
    worker_id: str,
    info: dict[str, Any],
    *,
    max_attempts: int,
    error_ttl: int = ERROR_TTL_S,
) -> tuple[int, int]:
    """Requeue a dead worker's requests, fail its poison requests and unregister it.
    Returns (requeued, poisoned)."""
    requeued, poisoned = await requeue_all(
        script, keys, worker_id, dead=True, max_attempts=max_attempts
    )
    for request_id in poisoned:
        await fail_poison(redis, script, keys, request_id, worker_id,
                          max_attempts=max_attempts, error_ttl=error_ttl)  # fmt: skip
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hdel(keys.workers, worker_id)
        pipe.hdel(keys.idle(info.get("pool", "default")), worker_id)
        if info.get("parent"):  # a distributor also stood in for its parent pool
            pipe.hdel(keys.idle(info["parent"]), worker_id)
        pipe.delete(keys.heartbeat(worker_id))
        pipe.hincrby(keys.stats, "dead_workers", 1)
        await pipe.execute()
    log.warning("worker %s is dead: requeued %d requests, failed %d poison requests",
                worker_id, requeued, len(poisoned))  # fmt: skip
    return requeued, len(poisoned)


class DeadChildRecovery:
    """What a supervisor calls with the pid of a child it has just reaped: the grid
    workers that process ran on this machine are retired at once.

    Matching is by host name and pid, which the worker registers: the supervisor has
    reaped the pid, so no live process holds it, and the child's replacement is started
    only afterwards.  A child that exited cleanly has already handed its work back and
    unregistered, so this finds nothing to do.  Errors are logged, not raised: the
    heartbeat TTL remains the backstop.
    """

    def __init__(self, url: str, namespace: str = "default", *, timeout: float = 10.0) -> None:
        self.url = url
        self.keys = Keys(namespace)
        self.timeout = timeout
        self.host = socket.gethostname()

    def __call__(self, pid: int) -> list[str]:
        try:
            return asyncio.run(asyncio.wait_for(self._retire(pid), self.timeout))
        except Exception as exc:
            log.warning("could not requeue the work of dead worker process %d at once (%s); "
                        "its heartbeat will expire instead", pid, exc)  # fmt: skip
            return []

    async def _retire(self, pid: int) -> list[str]:
        redis = await connect_redis(self.url, reconnect_timeout=1.0)
        try:
            workers = await redis.hgetall(self.keys.workers)
            mine = {}
            for raw_id, raw_info in workers.items():
                try:
                    info = json.loads(raw_info)
                except ValueError:
                    continue
                if info.get("pid") == pid and info.get("host") == self.host:
                    mine[raw_id.decode()] = info
            if not mine:
                return []
            registered = {s.name: redis.register_script(s.source) for s in scripts.ALL}

            async def script(name: str, args: Sequence[Any]) -> Any:
                return await registered[name](keys=[], args=list(args))

            attempts = settings.liveness().max_attempts
            for worker_id, info in mine.items():
                await retire_dead_worker(redis, script, self.keys, worker_id, info,
                                         max_attempts=attempts)  # fmt: skip
            return list(mine)
        finally:
            await redis.aclose()
