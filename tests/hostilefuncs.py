"""Grid functions that misbehave: they exit, crash, spin, or return what cannot be stored."""

from __future__ import annotations

import asyncio
import os
import sys

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
