"""Dask distributed task functions of the benchmarks (the same work as ``tasks_pygirder``).

Plain functions: Dask ships them by reference, so the workers import this module.
Tasks that wait on other tasks use ``worker_client()``, which secedes the waiting
task from the worker's thread pool (Dask's documented way to launch tasks from tasks).
"""

from __future__ import annotations

import time

import tasks_common as common
from distributed import worker_client


def noop(salt: str, i: int) -> int:
    return i


def tree(salt: str, depth: int, k: int) -> int:
    if depth == 0:
        return 1
    with worker_client() as client:
        kids = [
            client.submit(tree, salt, depth - 1, 2 * k, pure=False),
            client.submit(tree, salt, depth - 1, 2 * k + 1, pure=False),
        ]
        a, b = client.gather(kids)
    return a + b + 1


def paths_node(salt: str, i: int, j: int, log: str, a: int, b: int) -> int:
    common.record(log, f"paths:{i}:{j}")
    return a + b


def paths_leaf(salt: str, i: int, j: int, log: str) -> int:
    common.record(log, f"paths:{i}:{j}")
    return 1


def slow(salt: str, seconds: float, log: str) -> int:
    common.record(log, "slow")
    time.sleep(seconds)
    return 1


def burn(salt: str, k: int, seconds: float) -> int:
    common.burn(seconds)
    return k


def skew_parent(salt: str, durations: list[float]) -> int:
    with worker_client() as client:
        kids = [client.submit(burn, salt, k, d, pure=False) for k, d in enumerate(durations)]
        return sum(client.gather(kids))


def nap(salt: str, i: int, seconds: float) -> int:
    time.sleep(seconds)
    return 2 * i


def blob(salt: str, i: int, size: int) -> bytes:
    return common.payload(i, size)
