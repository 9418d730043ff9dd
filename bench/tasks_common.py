"""Plain-Python pieces every system's task module shares: work, payloads, side channels.

Nothing here knows about a grid.  The per-system task modules (``tasks_pygirder``,
``tasks_ray``, ``tasks_dask``, ``tasks_celery``) wrap these in their own decorators so
every system runs exactly the same work.
"""

from __future__ import annotations

import functools
import math
import os
import random
import time

BLOCK = 1 << 20  # payloads repeat one pseudo-random 1 MiB block (binary, incompressible)


def record(log: str, tag: str) -> None:
    """Append one line per execution to ``log``: a side channel outside the system measured.

    ``O_APPEND`` with a single short write is atomic on a local file system, so lines
    from several processes never interleave.
    """
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{tag}\n".encode())
    finally:
        os.close(fd)


def count(log: str) -> dict[str, int]:
    """Executions per tag recorded in ``log`` (an empty dict when nothing ran)."""
    counts: dict[str, int] = {}
    if os.path.exists(log):
        with open(log) as fh:
            for line in fh:
                tag = line.strip()
                counts[tag] = counts.get(tag, 0) + 1
    return counts


def burn(seconds: float) -> float:
    """Spin for ``seconds`` of this thread's CPU time (so preemption does not shorten it)."""
    end = time.thread_time() + seconds
    x = 0.0
    while time.thread_time() < end:
        for i in range(200):
            x += math.sqrt(i)
    return seconds


@functools.cache
def _block() -> bytes:
    return random.Random(1234).randbytes(BLOCK)


def payload(i: int, size: int) -> bytes:
    """``size`` bytes, distinct for every ``i``: an 8-byte header then the shared block."""
    block = _block()
    body = block * (size // BLOCK) + block[: size % BLOCK]
    return i.to_bytes(8, "big") + body[8:]


def check_payload(i: int, size: int, data: bytes) -> bool:
    return len(data) == size and data[:8] == i.to_bytes(8, "big")


def skew_durations(n: int, total: float, seed: int = 42) -> list[float]:
    """``n`` log-normal durations (sigma 1) scaled to sum to ``total`` seconds."""
    rng = random.Random(seed)
    raw = [rng.lognormvariate(0.0, 1.0) for _ in range(n)]
    scale = total / sum(raw)
    return [round(r * scale, 6) for r in raw]


def tree_local(depth: int) -> int:
    """The B3 tree as plain recursion: the floor every grid is compared with."""
    if depth == 0:
        return 1
    return tree_local(depth - 1) + tree_local(depth - 1) + 1


def tree_size(depth: int) -> int:
    return 2 ** (depth + 1) - 1


def paths_nodes(n: int) -> list[tuple[int, int]]:
    """Every (i, j) the lattice recursion paths(n, n) reaches, in dependency order."""
    nodes = [(i, j) for i in range(n + 1) for j in range(n + 1) if (i, j) != (0, 0)]
    return sorted(nodes, key=lambda ij: ij[0] + ij[1])


def paths_value(n: int) -> int:
    return math.comb(2 * n, n)
