"""Errors across the wire: what user code raises becomes the RemoteError its callers
see, and a server's refusal becomes the local exception that says what to do.
"""

from __future__ import annotations

from ..errors import CallLink, GridOutOfMemory, RemoteError
from .connection import redact


def describe_exception(exc: BaseException, request_id: str, function: str) -> RemoteError:
    """Turn an exception raised by user code into the error its callers will see."""
    import traceback

    link = CallLink(request_id, function)
    if isinstance(exc, RemoteError):  # a sub-call failed and the caller let it through
        return RemoteError(exc.remote_type, exc.message, exc.traceback, [*exc.chain, link])
    etype = type(exc)
    qual = (
        etype.__qualname__
        if etype.__module__ == "builtins"
        else (f"{etype.__module__}.{etype.__qualname__}")
    )
    tb = "".join(traceback.format_exception(exc))
    return RemoteError(qual, str(exc), tb, [link])


def out_of_memory(url: str, action: str) -> GridOutOfMemory:
    """The error for a write the server refused because it reached its maxmemory."""
    return GridOutOfMemory(
        f"the grid's server at {redact(url)} is out of memory (it reached its maxmemory and "
        f"never evicts grid state), so {action!r} was refused. Raise its limit "
        "(`pygirder server --maxmemory 8gb`, PYGIRDER_MAXMEMORY for the private server of "
        "connect(), or CONFIG SET maxmemory), drop results nobody needs "
        "(`pygirder gc --older-than 1h`, grid.gc(3600)), or keep results for a while "
        "only (`pygirder worker --result-ttl SECONDS`)"
    )
