"""A supervisor's view of recovery: the requests of a child worker it has just reaped
go back to their pools at once, not when the worker's heartbeat expires.

A supervisor on the same machine (``pygirder worker --processes N``, the local workers
of ``pygirder.connect()``, the agent on a fleet instance) learns of a child's death the
moment it reaps the process; the callers' wait is then the re-run, not the heartbeat
TTL.  The steps are the reaper's own (:meth:`Recovery.retire`: REQUEUE a page of 512 at
a time, the death counted against every request the worker held, poison failed after
``PYGIRDER_MAX_ATTEMPTS``); the heartbeat TTL stays the backstop for lost machines.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket

from .runtime import Runtime
from .worker.recovery import Recovery

log = logging.getLogger("pygirder.recovery")

ERROR_TTL_S = 300  # seconds the error of a poison request is kept, as a worker keeps errors


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
        self.namespace = namespace
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
        runtime = Runtime(self.url, namespace=self.namespace, process_id=f"supervisor-{pid}")
        await runtime.connect(reconnect_timeout=1.0)
        assert runtime.redis is not None
        try:
            workers = await runtime.redis.hgetall(runtime.keys.workers)
            mine = {}
            for raw_id, raw_info in workers.items():
                try:
                    info = json.loads(raw_info)
                except ValueError:
                    continue
                if info.get("pid") == pid and info.get("host") == self.host:
                    mine[raw_id.decode() if isinstance(raw_id, bytes) else raw_id] = info
            for worker_id, info in mine.items():
                recovery = Recovery(runtime, worker_id=worker_id, pool=info.get("pool", "default"),
                                    error_ttl=ERROR_TTL_S)  # fmt: skip
                await recovery.retire(worker_id, info)
            return list(mine)
        finally:
            await runtime.redis.aclose()
