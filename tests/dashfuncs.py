"""Grid functions for the status and dashboard tests (importable by the worker processes)."""

from __future__ import annotations

import time

import pygirder


@pygirder.fn
def nap(i: int, seconds: float) -> int:
    """A leaf that takes a known time, so a job lasts long enough to be watched."""
    time.sleep(seconds)
    return i


@pygirder.fn
def fan(n: int, seconds: float) -> int:
    """A parent with ``n`` children: something to click through in the call explorer."""
    return sum(pygirder.wait(*(nap(i, seconds) for i in range(n))))


@pygirder.fn
def explode(x: int) -> int:
    """Fails with a recognisable message, for the recent-failures list."""
    raise RuntimeError(f"exploded on {x}")


@pygirder.fn
def explode_via(x: int) -> int:
    """Fails through a child, so the failure has a parent and a call chain."""
    return explode(x).result() + 1
