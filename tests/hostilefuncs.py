"""Grid functions that misbehave: they exit, crash, spin, or return what cannot be stored."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

import pygirder


class Custom(BaseException):
    """A BaseException of the user's own."""


def make(kind: str) -> BaseException:
    return {
        "SystemExit": lambda: SystemExit(3),
        "KeyboardInterrupt": lambda: KeyboardInterrupt("from user code"),
        "GeneratorExit": lambda: GeneratorExit("from user code"),
        "Custom": lambda: Custom("a custom BaseException"),
        "CancelledError": lambda: asyncio.CancelledError("raised by user code"),
    }[kind]()


@pygirder.fn
def raises(kind: str) -> int:
    if kind == "SystemExit":
        sys.exit(3)
    raise make(kind)


@pygirder.fn
async def araises(kind: str) -> int:
    await asyncio.sleep(0)
    if kind == "SystemExit":
        sys.exit(3)
    raise make(kind)


@pygirder.fn
def inc(x: int) -> int:
    return x + 1


@pygirder.fn
def dies(x: int) -> int:
    os._exit(1)  # no cleanup, no reply: like a crash in an extension


@pygirder.fn
async def tears_down_loop(x: int) -> int:
    # an exit raised by the event loop itself, outside this call's own frames
    asyncio.get_running_loop().call_soon(sys.exit, 4)
    await asyncio.sleep(5)
    return x


@pygirder.fn
def sync_chain(n: int) -> int:
    return 0 if n == 0 else sync_chain(n - 1).result() + 1


@pygirder.fn
def big_result(n: int) -> bytes:
    return b"x" * n


@pygirder.fn(max_runtime=1)
def spin(x: int) -> int:
    while True:
        x += 1


@pygirder.fn(max_runtime=1)
async def aspin(x: int) -> int:
    while True:  # blocks the event loop: only a thread can notice
        x += 1


@pygirder.fn
def spin_unlimited(x: int) -> int:
    while True:
        x += 1


@pygirder.fn
def waits_on_spin(x: int) -> int:
    return spin(x).result() + inc(x).result()


def _where() -> str:
    return threading.current_thread().name


@pygirder.fn
def spins_for(i: int, seconds: float) -> str:
    """Pure Python for ``seconds`` (no C call to wait in); the thread it ended on."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return _where()


@pygirder.fn
def sleeps_for(i: int, seconds: float, log: str) -> tuple[str, int]:
    """Blocked in C (``time.sleep``) for ``seconds``; one line in ``log`` per execution;
    the thread it ended on and its process."""
    with open(log, "a") as fh:
        fh.write(f"{i}\n")
    time.sleep(seconds)
    return _where(), os.getpid()


@pygirder.fn(max_runtime=2)
def sleeps_limited(i: int, seconds: float) -> str:
    """``sleeps_for`` under a max_runtime."""
    time.sleep(seconds)
    return _where()


def _first(call: pygirder.Call[int]) -> int:
    return pygirder.wait(call)[0]


@pygirder.fn
def waits_if(x: int, wait: bool) -> tuple[int, str]:
    """Waits on a sub-call (through a helper) only when told; swallows whatever stops
    the wait."""
    if not wait:
        return x, _where()
    try:
        return _first(inc(x)), _where()
    except BaseException:  # hostile: what stops the wait must not stop the rerun
        return -1, _where()


@pygirder.fn
def names_a_wait(x: int, wait: bool) -> str:
    return str(inc(x).result()) if wait else _where()


@pygirder.fn
def exits_if(i: int, kind: str) -> str:
    """Raises ``kind`` (a BaseException) naming the thread it runs on; else returns it."""
    if kind == "SystemExit":
        sys.exit(f"exit on {_where()}")
    if kind:
        raise Custom(f"custom on {_where()}")
    return _where()


@pygirder.fn
async def blocks_loop(x: int) -> int:
    return inc(x).result()  # a blocking wait inside an async function
