"""Distributors: link a child pool to a parent pool, so pools form a hierarchy.

A distributor is a small process (`pygirder distributor --pool CHILD --parent PARENT`)
that volunteers its child pool's idle workers to the parent pool and passes the
child's overflow up, where a sibling's distributor can take it.  Several levels
(machine, rack or zone, cluster) are several distributors.  Each tick is one atomic
script (``store/lua/distribute.lua``), so distributors never race workers or each other.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import time
from typing import Any

from ..errors import ConfigError
from ..store import scripts
from .runtime import Runtime, new_process_id

log = logging.getLogger("pygirder.distributor")


class Distributor:
    """Moves requests between a child pool and its parent; ``await run()`` until stop()."""

    def __init__(
        self,
        url: str,
        *,
        pool: str,
        parent: str,
        namespace: str = "default",
        period: float = 0.01,
        max_moves: int = 64,
    ) -> None:
        if pool == parent:
            raise ConfigError(f"--pool {pool!r} and --parent {parent!r} must differ")
        self.id = new_process_id("distributor")
        self.pool = pool
        self.parent = parent
        self.period = period
        self.max_moves = max_moves
        self.runtime = Runtime(url, namespace=namespace, process_id=self.id, call_graph=False)
        self.keys = self.runtime.keys
        self.moved_down = 0
        self.moved_up = 0
        self.started = time.time()
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def _register(self) -> None:
        assert self.runtime.redis is not None
        info = {
            "id": self.id, "kind": "distributor", "host": socket.gethostname(),
            "pid": os.getpid(), "pool": self.pool, "parent": self.parent,
            "started": self.started, "beat": time.time(), "processed": 0,
            "moved_down": self.moved_down, "moved_up": self.moved_up, "state": "idle",
        }  # fmt: skip
        await self.runtime.redis.hset(self.keys.workers, self.id, json.dumps(info))

    async def run(self) -> dict[str, Any]:
        self.runtime.beat_hooks.append(self._register)
        await self.runtime.start()
        log.info("distributor %s: pool %r under %r", self.id, self.pool, self.parent)
        try:
            while not self._stopping.is_set():
                try:
                    down, up = await scripts.distribute(
                        self.runtime, self.keys, child=self.pool, parent=self.parent,
                        distributor=self.id, max_moves=self.max_moves,
                    )  # fmt: skip
                except Exception as exc:  # the server may be restarting: keep trying
                    log.warning("distribute tick failed: %s", exc)
                    down = up = 0
                    await asyncio.sleep(0.5)
                self.moved_down += down
                self.moved_up += up
                if not (down or up):
                    try:
                        await asyncio.wait_for(self._stopping.wait(), self.period)
                    except TimeoutError:
                        pass
        finally:
            redis = self.runtime.redis
            assert redis is not None
            async with redis.pipeline(transaction=False) as pipe:
                pipe.hdel(self.keys.idle(self.pool), self.id)
                pipe.hdel(self.keys.idle(self.parent), self.id)
                pipe.hdel(self.keys.workers, self.id)
                await pipe.execute()
            await self.runtime.close()
        return {"id": self.id, "moved_down": self.moved_down, "moved_up": self.moved_up}


def run_distributor(url: str, *, pool: str, parent: str, namespace: str = "default") -> dict:
    """Run a distributor in this process until SIGTERM/SIGINT."""
    distributor = Distributor(url, pool=pool, parent=parent, namespace=namespace)

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, distributor.stop)
        return await distributor.run()

    return asyncio.run(main())
