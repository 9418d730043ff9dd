"""Where a waiting call runs: inside a worker's request, or in a client of a Grid.

``call.result()``, ``pygirder.wait``, ``await call`` and ``pygirder.gather`` look here to
find the runtime to wait on, so user code never passes a grid handle around.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..calls import Call, register_waiter
from ..errors import GridFunctionError

if TYPE_CHECKING:
    from .client import Grid
    from .worker import Worker


@dataclass(frozen=True)
class RequestContext:
    """The request a piece of user code is running for, on a worker."""

    worker: Worker
    request_id: str
    function: str
    # grid functions it waited on -> their fingerprints (kept with its durable result)
    deps: dict[str, str] = field(default_factory=dict)


current_request: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "pygirder_current_request", default=None
)

_default_grids: list[Grid] = []


def push_default(grid: Grid) -> None:
    _default_grids.append(grid)


def pop_default(grid: Grid) -> None:
    if grid in _default_grids:
        _default_grids.remove(grid)


def default_grid() -> Grid:
    if not _default_grids:
        raise GridFunctionError(
            "no grid to run on: open one first, e.g. `with pygirder.connect() as grid:` "
            "(or call grid.run(call) on a Grid you hold)"
        )
    return _default_grids[-1]


def _check_calls(calls: Iterable[Any]) -> list[Call[Any]]:
    out = list(calls)
    for i, c in enumerate(out):
        if not isinstance(c, Call):
            hint = ""
            if callable(c):
                hint = " (call the grid function to make a Call: f(x), not f)"
            raise GridFunctionError(
                f"argument {i} is {type(c).__name__} {c!r:.60}, not a grid Call{hint}; "
                "decorate the function with @pygirder.fn and pass f(args)"
            )
    return out


def wait_sync(calls: Iterable[Any], timeout: float | None = None) -> list[Any]:
    """Block until every call has a result; inside a worker this frees its CPU slot."""
    checked = _check_calls(calls)
    ctx = current_request.get()
    if ctx is not None:
        return ctx.worker.wait_from_thread(checked, ctx, timeout)
    return default_grid().wait(checked, timeout=timeout)


async def gather_async(calls: Iterable[Any], timeout: float | None = None) -> list[Any]:
    checked = _check_calls(calls)
    ctx = current_request.get()
    if ctx is not None:
        return await ctx.worker.gather(checked, ctx, timeout)
    return await default_grid().gather_async(checked, timeout=timeout)


class ContextWaiter:
    """The :class:`pygirder.calls.Waiter` of this process: waits where the caller runs."""

    def wait_sync(self, calls: Iterable[Any], timeout: float | None) -> list[Any]:
        return wait_sync(calls, timeout)

    async def gather_async(self, calls: Iterable[Any], timeout: float | None) -> list[Any]:
        return await gather_async(calls, timeout)


register_waiter(ContextWaiter())
