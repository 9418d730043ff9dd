"""Ray remote functions of the benchmarks (the same work as ``tasks_pygirder``)."""

from __future__ import annotations

import time

import ray
import tasks_common as common


@ray.remote
def noop(salt: str, i: int) -> int:
    return i


@ray.remote
def tree(salt: str, depth: int, k: int) -> int:
    """B3: blocking ``ray.get`` inside a task, as a Ray user writes recursion."""
    if depth == 0:
        return 1
    a, b = ray.get([tree.remote(salt, depth - 1, 2 * k), tree.remote(salt, depth - 1, 2 * k + 1)])
    return a + b + 1


@ray.remote
def paths_node(salt: str, i: int, j: int, log: str, a: int, b: int) -> int:
    """B4: one lattice node; the driver passes its children's object refs as a and b."""
    common.record(log, f"paths:{i}:{j}")
    return a + b


@ray.remote
def paths_leaf(salt: str, i: int, j: int, log: str) -> int:
    common.record(log, f"paths:{i}:{j}")
    return 1


@ray.remote
def slow(salt: str, seconds: float, log: str) -> int:
    common.record(log, "slow")
    time.sleep(seconds)
    return 1


@ray.remote
def burn(salt: str, k: int, seconds: float) -> int:
    common.burn(seconds)
    return k


@ray.remote
def skew_parent(salt: str, durations: list[float]) -> int:
    return sum(ray.get([burn.remote(salt, k, d) for k, d in enumerate(durations)]))


@ray.remote
def nap(salt: str, i: int, seconds: float) -> int:
    time.sleep(seconds)
    return 2 * i


@ray.remote
def blob(salt: str, i: int, size: int) -> bytes:
    return common.payload(i, size)
