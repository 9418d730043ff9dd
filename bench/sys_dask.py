"""Dask distributed under benchmark: LocalCluster, 2 worker processes of 1 thread each.

``LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
dashboard_address=None)``: each worker runs under a nanny that restarts it if it dies.
Keys are Dask's default (``pure=True``): identical calls submitted together share one
key and run once, which is Dask's honest within-graph deduplication.
"""

from __future__ import annotations

import os
from typing import Any

import harness
import tasks_common
import tasks_dask as td
from distributed import Client, LocalCluster, wait
from harness import DidNotComplete


def _wait(futures: list[Any], timeout: float) -> None:
    try:
        wait(futures, timeout=timeout)
    except TimeoutError:
        raise DidNotComplete(f"no result within {timeout:.0f}s") from None


class DaskSystem(harness.System):
    name = "dask"

    def __init__(self) -> None:
        self.cluster: LocalCluster | None = None
        self.client: Client | None = None

    def start(self) -> None:
        self.cluster = LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        )
        self.client = Client(self.cluster)

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def conn_info(self) -> dict[str, Any]:
        assert self.cluster is not None
        return {"address": self.cluster.scheduler_address}

    @classmethod
    def attach(cls, info: dict[str, Any]) -> DaskSystem:
        self = cls()
        self.client = Client(info["address"])
        return self

    def detach(self) -> None:
        if self.client is not None:
            self.client.close()

    @property
    def c(self) -> Client:
        assert self.client is not None
        return self.client

    def _gather(self, futures: list[Any], timeout: float) -> list[Any]:
        _wait(futures, timeout)
        return self.c.gather(futures)

    def fan_out(self, salt: str, n: int, timeout: float) -> list[int]:
        return self._gather(self.c.map(td.noop, [salt] * n, range(n)), timeout)

    def ping(self, salt: str, i: int, timeout: float) -> int:
        return self._gather([self.c.submit(td.noop, salt, i)], timeout)[0]

    def tree(self, salt: str, depth: int, timeout: float) -> int:
        return self._gather([self.c.submit(td.tree, salt, depth, 0, pure=False)], timeout)[0]

    def shared(
        self, salt: str, n: int, copies: int, seconds: float, log: str, timeout: float
    ) -> dict[str, Any]:
        # The client builds the lattice as a graph with its own memo dict; the identical
        # slow calls get the same key, so Dask runs them once.
        slow = [self.c.submit(td.slow, salt, seconds, log) for _ in range(copies)]
        futs: dict[tuple[int, int], Any] = {}
        for i, j in tasks_common.paths_nodes(n):
            if i == 0 or j == 0:
                futs[i, j] = self.c.submit(td.paths_leaf, salt, i, j, log)
            else:
                futs[i, j] = self.c.submit(
                    td.paths_node, salt, i, j, log, futs[i - 1, j], futs[i, j - 1]
                )
        values = self._gather([futs[n, n], *slow], timeout)
        return {"paths": values[0], "slow": values[1:]}

    def skew(self, salt: str, durations: list[float], timeout: float) -> int:
        fut = self.c.submit(td.skew_parent, salt, durations, pure=False)
        return self._gather([fut], timeout)[0]

    def naps(self, salt: str, n: int, seconds: float, timeout: float) -> list[Any]:
        futs = self.c.map(td.nap, [salt] * n, range(n), [seconds] * n)
        _wait(futs, timeout)
        if any(f.status == "error" for f in futs):
            return [f.exception() if f.status == "error" else f.result() for f in futs]
        return self.c.gather(futs)

    def victim(self) -> int:
        pids = self.c.run(os.getpid)
        return sorted(pids.values())[0]

    def blobs(self, salt: str, n: int, size: int, timeout: float) -> list[bytes]:
        return self._gather(self.c.map(td.blob, [salt] * n, range(n), [size] * n), timeout)
