"""pygirder grid functions of the benchmarks; workers import this (``--import tasks_pygirder``).

Every function takes a ``salt`` first: each measured run uses a new salt, so no run is
answered from the memo of an earlier one unless the workload is about exactly that (B5).
"""

from __future__ import annotations

import time

import tasks_common as common

import pygirder


@pygirder.fn
def noop(salt: str, i: int) -> int:
    """B1, B2: an empty call."""
    return i


@pygirder.fn
def tree(salt: str, depth: int, k: int) -> int:
    """B3: a binary tree; every inner node blocks on its two children."""
    if depth == 0:
        return 1
    a, b = pygirder.wait(tree(salt, depth - 1, 2 * k), tree(salt, depth - 1, 2 * k + 1))
    return a + b + 1


@pygirder.fn
def paths(salt: str, i: int, j: int, log: str) -> int:
    """B4: lattice paths from (i, j) to (0, 0), written as the plain recursion."""
    common.record(log, f"paths:{i}:{j}")
    if i == 0 or j == 0:
        return 1
    a, b = pygirder.wait(paths(salt, i - 1, j, log), paths(salt, i, j - 1, log))
    return a + b


@pygirder.fn
def slow(salt: str, seconds: float, log: str) -> int:
    """B4: the identical call 200 callers ask for at once."""
    common.record(log, "slow")
    time.sleep(seconds)
    return 1


@pygirder.fn
def burn(salt: str, k: int, seconds: float) -> int:
    """B6: one CPU-bound child."""
    common.burn(seconds)
    return k


@pygirder.fn
def skew_parent(salt: str, durations: list[float]) -> int:
    """B6: one parent that spawns every child and waits for all of them."""
    kids = [burn(salt, k, d) for k, d in enumerate(durations)]
    return sum(pygirder.wait(kids))


@pygirder.fn
def nap(salt: str, i: int, seconds: float) -> int:
    """B7: a 50 ms call."""
    time.sleep(seconds)
    return 2 * i


@pygirder.fn
def blob(salt: str, i: int, size: int) -> bytes:
    """B8: a large result."""
    return common.payload(i, size)
