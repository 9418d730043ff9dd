"""Grid functions the tests run on real worker processes (importable by them).

Functions that must be counted append one line per execution to a file the test
owns: a side channel that does not go through the grid under test.
"""

from __future__ import annotations

import os
import time

import pygirder


def record(log: str, tag: str) -> None:
    with open(log, "a") as fh:  # O_APPEND: one write per line, safe across processes
        fh.write(f"{tag}\n")


def count(log: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    if os.path.exists(log):
        with open(log) as fh:
            for line in fh:
                counts[line.strip()] = counts.get(line.strip(), 0) + 1
    return counts


@pygirder.fn
def add(a: int, b: int = 0) -> int:
    return a + b


@pygirder.fn
def paths(i: int, j: int, log: str) -> int:
    """Lattice paths from (i, j) to (0, 0): overlapping sub-calls everywhere."""
    record(log, f"paths:{i}:{j}")
    if i == 0 or j == 0:
        return 1
    a, b = pygirder.wait(paths(i - 1, j, log), paths(i, j - 1, log))
    return a + b


@pygirder.fn
def slow(x: int, seconds: float, log: str) -> int:
    record(log, f"slow:{x}")
    time.sleep(seconds)
    return x * 10


@pygirder.fn
def gated(x: int, gate: str, log: str) -> int:
    """Holds its worker until the file ``gate`` exists (at most a minute): a test opens
    the gate when it has done what must happen while the worker is busy."""
    record(log, f"gated:{x}")
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return x * 10


@pygirder.fn
def impatient(x: int, pool: str, log: str) -> str:
    """Waits briefly on two children in ``pool`` and reports what it got."""
    child = gated.options(pool=pool)
    try:
        return str(pygirder.wait(child(x, "", log), child(x + 1, "", log), timeout=0.2))
    except pygirder.GridTimeout as exc:
        return f"timed out on {len(exc.call_ids)}: {exc}"


@pygirder.fn
def gated_pid(x: int, gate: str, log: str) -> int:
    """``gated`` that records the pid of each process that starts it."""
    record(log, f"pid:{os.getpid()}")
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return x * 10


@pygirder.fn
def wait_slow(i: int, x: int, seconds: float, log: str) -> int:
    record(log, f"wait_slow:{i}")
    return slow(x, seconds, log).result() + i


@pygirder.fn
def chain(n: int) -> int:
    """Sync recursion n deep: every level waits on the next one."""
    if n == 0:
        return 0
    return chain(n - 1).result() + 1


@pygirder.fn
def wide(n: int) -> int:
    return sum(pygirder.wait(*(add(i, n) for i in range(n))))


@pygirder.fn
async def async_chain(n: int) -> int:
    if n == 0:
        return 0
    return (await sync_of_async(n - 1)) + 1


@pygirder.fn
def sync_of_async(n: int) -> int:
    if n == 0:
        return 0
    return async_chain(n - 1).result() + 1


@pygirder.fn
async def async_sum(n: int) -> int:
    values = await pygirder.gather(*(add(i) for i in range(n)))
    return sum(values)


# --- the shared-sub-request scenario that deadlocks depth-first Fork-Join ---------
@pygirder.fn
def node_e(log: str, seconds: float) -> str:
    record(log, "E")
    time.sleep(seconds)
    return "E"


@pygirder.fn
def node_d(log: str, seconds: float) -> str:
    record(log, "D")
    return "D" + node_e(log, seconds).result()


@pygirder.fn
def node_b(log: str, seconds: float) -> str:
    record(log, "B")
    return "B" + node_d(log, seconds).result()


@pygirder.fn
def node_c(log: str, seconds: float) -> str:
    record(log, "C")
    return "C" + node_d(log, seconds).result()


@pygirder.fn
def node_a(log: str, seconds: float) -> str:
    record(log, "A")
    b, c = pygirder.wait(node_b(log, seconds), node_c(log, seconds))
    return "A" + b + c


# --- errors ----------------------------------------------------------------------
class Boom(ValueError):
    pass


@pygirder.fn
def fail_level3(x: int) -> int:
    raise Boom(f"bad input {x}")


@pygirder.fn
def fail_level2(x: int) -> int:
    return fail_level3(x).result() + 1


@pygirder.fn
def fail_level1(x: int) -> int:
    return fail_level2(x).result() + 1


@pygirder.fn
def catches(x: int) -> str:
    try:
        fail_level3(x).result()
    except pygirder.RemoteError as exc:
        return f"caught {exc.remote_type}"
    return "no error"


@pygirder.fn(version="1")
def versioned(x: int) -> int:
    return x


@pygirder.fn
def returns_unencodable() -> object:
    return object()


@pygirder.fn
def self_wait(x: int) -> int:
    return self_wait(x).result()


# --- reliability ------------------------------------------------------------------
@pygirder.fn
def chaos_tree(depth: int, fanout: int, k: int, leaf_s: float, log: str = "") -> int:
    """A sync re-entrant tree; returns its number of nodes."""
    if log:
        record(log, f"node:{depth}:{k}")
    if depth == 0:
        time.sleep(leaf_s)
        return 1
    kids = pygirder.wait(
        *(chaos_tree(depth - 1, fanout, k * fanout + i, leaf_s, log) for i in range(fanout))
    )
    return 1 + sum(kids)


@pygirder.fn
def crash(x: int) -> int:
    os._exit(3)  # dies like a segfault or an OOM kill would: no cleanup, no reply


@pygirder.fn
def crash_parent(x: int) -> int:
    return crash(x).result()


@pygirder.fn
def cyc_a(n: int) -> int:
    return cyc_b(n).result()


@pygirder.fn
def cyc_b(n: int) -> int:
    return cyc_a(n).result()


@pygirder.fn
def big_bytes(n: int) -> bytes:
    return b"x" * n


# --- pools and sharing --------------------------------------------------------------
def _here() -> tuple[str, str]:
    from pygirder.grid.context import current_request

    ctx = current_request.get()
    assert ctx is not None
    return ctx.worker.pool, ctx.worker.id


def burn(ms: float) -> None:
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass


@pygirder.fn
def pool_of(i: int, ms: float) -> str:
    burn(ms)
    return _here()[0]


@pygirder.fn(pool="big")
def on_big(i: int) -> str:
    return _here()[0]


@pygirder.fn
def spawn(n: int, ms: float) -> list[str]:
    """Children name no pool: they go to the pool this call runs in."""
    return pygirder.wait(*(pool_of(i, ms) for i in range(n)))


@pygirder.fn
def worker_of(i: int, ms: float) -> str:
    burn(ms)
    return _here()[1]


@pygirder.fn
def skewed(n: int, seed: int) -> list[str]:
    """One parent, n CPU-bound children with log-normal durations (median 10 ms)."""
    import random

    rng = random.Random(seed)
    return pygirder.wait(*(worker_of(i, 10 * rng.lognormvariate(0, 0.8)) for i in range(n)))


@pygirder.fn
def third(n: int) -> object:
    """A result msgpack cannot carry (needs the opt-in pickle codec)."""
    import fractions

    return fractions.Fraction(1, 3) * n


@pygirder.fn
def noisy(i: int) -> int:
    import logging

    logging.getLogger("gridfuncs").warning("hello from call %d", i)
    time.sleep(0.1)
    return i


@pygirder.fn
def sized(i: int, size: int, pause: float, log: str) -> bytes:
    """A result of ``size`` bytes after ``pause`` seconds (the durable store's memory test)."""
    record(log, f"sized:{i}")
    time.sleep(pause)
    return bytes([i % 256]) * size


@pygirder.fn
def held(i: int, gate: str) -> str:
    """Says it started (a file ``started-<i>-<worker>`` in the folder ``gate``), then
    holds its worker until the test creates ``gate/open`` (at most 30 s)."""
    worker = _here()[1]
    with open(os.path.join(gate, f"started-{i}-{worker}"), "w"):
        pass
    deadline = time.monotonic() + 30
    while not os.path.exists(os.path.join(gate, "open")) and time.monotonic() < deadline:
        time.sleep(0.01)
    return worker


@pygirder.fn
def fan_held(n: int, gate: str, pool: str = "") -> list[str]:
    """One parent, ``n`` children held at ``gate`` (in ``pool``, or the parent's)."""
    child = held.options(pool=pool) if pool else held
    return pygirder.wait(*(child(i, gate) for i in range(n)))


@pygirder.fn
def digest(data: bytes) -> list[int]:
    import zlib

    return [len(data), zlib.crc32(data)]


@pygirder.fn
def digest_inside(data: bytes) -> list[int]:
    return digest(data).result()
