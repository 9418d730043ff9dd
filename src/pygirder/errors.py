"""The exceptions pygirder raises, one tree rooted at PygirderError.

    PygirderError
     ├── CodecError              a value cannot be encoded/decoded (names the argument path)
     │    └── PayloadTooLarge    an argument or result is over the configured size limit
     ├── GridFunctionError       misuse of @fn or of a Call at the call site (lambda, closure,
     │                           unregistered function, wrong arguments)
     ├── RemoteError             a grid call failed remotely (carries type, message, traceback,
     │                           and the chain of calls from the failure up to the caller)
     ├── GridTimeout             a wait ran out of time (also a TimeoutError)
     ├── GridCycleError          a call waits, through other calls, on itself
     ├── PoisonRequest           a request killed its worker too many times
     ├── MaxRuntimeExceeded      a call computed longer than its max_runtime
     ├── GridOutOfMemory         the server reached its maxmemory and refused a write
     ├── GridConnectionError     the Redis-protocol server cannot be reached or refused us
     ├── ConfigError             invalid configuration (names the key, the value, what is allowed)
     ├── NotStored               the result store has no usable result of a call that nothing
     │                           will compute (also a LookupError)
     ├── CallLookupError         an id prefix names no call, or several (also a LookupError;
     │                           raised by the status reader behind `inspect` and the dashboard)
     └── ImportRefused           a request named a module this worker may not import (the
                                 worker reports it to the caller as a failed request)

Every error carries the data needed to act on it, and its message says what to do next.
Every class above CallLookupError is exported by ``pygirder``; the last two are met
only inside the command line, the dashboard and the worker.  ``CallLink`` is not an
exception: it is one entry of a RemoteError's chain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class PygirderError(Exception):
    """Base of every exception pygirder raises on purpose."""


class CodecError(PygirderError, TypeError):
    """A value cannot be encoded or decoded; ``path`` names where, e.g. ``args.x[2]``."""

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class PayloadTooLarge(CodecError):
    """An encoded argument or result is larger than the configured limit."""

    def __init__(self, message: str, *, path: str = "", size: int = 0, limit: int = 0) -> None:
        super().__init__(message, path=path)
        self.size = size
        self.limit = limit


class GridFunctionError(PygirderError, TypeError):
    """A grid function or call was used in a way that cannot work on a grid."""


class ConfigError(PygirderError, ValueError):
    """Invalid configuration: the message names the key, the value and what is allowed."""


class GridConnectionError(PygirderError, ConnectionError):
    """The Redis-protocol server is unreachable or refused the credentials."""


class GridTimeout(PygirderError, TimeoutError):
    """Waiting for a grid call took longer than the given timeout.

    The call itself is not failed: it keeps running and its result is memoized,
    so asking again later is cheap.
    """

    def __init__(self, message: str, *, call_ids: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.call_ids = call_ids


class GridCycleError(PygirderError):
    """A call waits, directly or through other calls, on itself: it can never finish."""

    def __init__(self, message: str, *, cycle: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.cycle = cycle


class PoisonRequest(PygirderError):
    """A request was started several times and its worker died every time.

    Raised (as a RemoteError with this type) to every waiter instead of retrying
    forever: the request most likely crashes or exhausts the worker process.
    """


class MaxRuntimeExceeded(PygirderError):
    """A call computed for longer than its ``max_runtime`` (``@fn`` or ``--max-runtime``).

    Raised (as a RemoteError with this type) to every waiter and not retried: a
    rerun would take as long.  Raise the limit or split the call into smaller ones.
    """


class GridOutOfMemory(PygirderError):
    """The grid's server reached its ``maxmemory`` and refused a write.

    Grid state is never evicted (policy ``noeviction``), so nothing was silently lost;
    raise the limit, drop old results (``pygirder gc``) or give results a TTL.
    """


class CallLookupError(PygirderError, LookupError):
    """No call, or more than one, matches an id (prefix).

    ``matches`` holds the ids that matched (empty: none did), so a caller can list the
    candidates of an ambiguous prefix.
    """

    def __init__(self, message: str, *, prefix: str, matches: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.prefix = prefix
        self.matches = matches


class NotStored(PygirderError, LookupError):
    """The durable result store holds no usable result of a call, and nothing will compute it.

    Raised by :meth:`pygirder.results.ResultStore.result` on a miss, and to the waiters
    of a grid without workers (``connect(store=..., workers=0)``) for a call its store
    cannot answer.  ``reason`` says why: ``"missing"`` (never stored, or pruned),
    ``"stale"`` (a function it waited on has other code now), ``"error"`` (an error,
    kept only with ``@pygirder.fn(cache_errors=True)``) or ``"unreadable"`` (the store
    could not be read).  A :class:`LookupError`, as ``KeyError`` is.
    """

    def __init__(self, message: str, *, call_id: str = "", reason: str = "missing") -> None:
        super().__init__(message)
        self.call_id = call_id
        self.reason = reason


class ImportRefused(PygirderError):
    """A request named a module this worker may not import."""


@dataclass(frozen=True)
class CallLink:
    """One call in a :class:`RemoteError` chain."""

    id: str
    function: str


@dataclass
class RemoteError(PygirderError):
    """A grid call raised; this is the remote exception as seen by its caller.

    ``chain`` starts at the call that raised and ends at the call the caller
    waited on, so a failure deep in a recursion says which path led to it.
    """

    remote_type: str
    message: str
    traceback: str = ""
    chain: list[CallLink] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(self.remote_type, self.message)

    def __str__(self) -> str:
        lines = [f"{self.remote_type}: {self.message}"]
        if self.chain:
            path = " <- ".join(f"{link.function}[{link.id[:12]}]" for link in self.chain)
            lines.append(f"  call chain (failing call first): {path}")
        if self.traceback:
            lines.append("  remote traceback:")
            lines.extend("    " + line for line in self.traceback.rstrip().splitlines())
        return "\n".join(lines)

    def __reduce__(self) -> tuple[type[RemoteError], tuple[str, str, str, list[CallLink]]]:
        # keep pickling/copying working despite the dataclass __init__
        return (RemoteError, (self.remote_type, self.message, self.traceback, self.chain))

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.remote_type,
            "message": self.message,
            "traceback": self.traceback,
            "chain": [[link.id, link.function] for link in self.chain],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RemoteError:
        return cls(
            remote_type=str(data.get("type", "Exception")),
            message=str(data.get("message", "")),
            traceback=str(data.get("traceback", "")),
            chain=[CallLink(str(i), str(f)) for i, f in data.get("chain", [])],
        )
