"""pygirder: pure Python functions on a grid of workers, memoized and shared grid-wide."""

import collections.abc
import typing

from .calls import Call, GridFunction, fn
from .codec import register
from .errors import (
    CodecError,
    ConfigError,
    GridConnectionError,
    GridCycleError,
    GridFunctionError,
    GridOutOfMemory,
    GridTimeout,
    MaxRuntimeExceeded,
    NotStored,
    PayloadTooLarge,
    PoisonRequest,
    PygirderError,
    RemoteError,
)
from .grid.client import Grid, GridFuture, connect
from .grid.context import gather_async as _gather_async
from .grid.context import wait_sync as _wait_sync

__version__ = "0.1.0"


def wait(*calls: Call[typing.Any], timeout: float | None = None) -> list[typing.Any]:
    """Results of the calls, in order.  Inside a sync grid function the worker's CPU
    slot goes to other work while this waits."""
    return _wait_sync(_flatten(calls), timeout)


async def gather(*calls: Call[typing.Any], timeout: float | None = None) -> list[typing.Any]:
    """Async twin of :func:`wait`: ``await pygirder.gather(f(1), f(2))``."""
    return await _gather_async(_flatten(calls), timeout)


def _flatten(calls: tuple[typing.Any, ...]) -> collections.abc.Iterable[typing.Any]:
    # wait([a, b]) and wait(a, b) both work, as with asyncio.gather(*aws) vs a list
    if len(calls) == 1 and isinstance(calls[0], list | tuple):
        return calls[0]
    return calls


__all__ = [
    "Call",
    "CodecError",
    "ConfigError",
    "Grid",
    "GridConnectionError",
    "GridCycleError",
    "GridFunction",
    "GridFunctionError",
    "GridFuture",
    "GridOutOfMemory",
    "GridTimeout",
    "MaxRuntimeExceeded",
    "NotStored",
    "PayloadTooLarge",
    "PoisonRequest",
    "PygirderError",
    "RemoteError",
    "__version__",
    "connect",
    "fn",
    "gather",
    "register",
    "wait",
]

for _name in __all__:
    _obj = globals()[_name]
    if hasattr(_obj, "__module__") and not isinstance(_obj, str):
        try:
            _obj.__module__ = "pygirder"
        except (AttributeError, TypeError):
            pass
del _name, _obj
