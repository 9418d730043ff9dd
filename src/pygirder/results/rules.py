"""When a stored result may answer a call: the rules every reader of the store applies.

A stored object is sound (``record`` checks that); whether it may stand in for running
the call is a separate question, asked the same way by a worker restoring what it
takes, by a client of a grid without workers, and by ``ResultStore.result``: a stored
error only if the function keeps its errors, and nothing stale, that is computed while
waiting on a grid function that has other code now.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from .. import calls as calls_mod
from ..calls import GridFunction
from .record import Meta

__all__ = ["ERR", "Current", "Refusal", "needs_function", "refusal", "registered"]

ERR = b"E"  # the status byte of an error envelope

#: The grid function a name has here now, given the fingerprint it had when the result
#: was computed (a worker may import its module to find it); None when unknown.
Current = Callable[[str, str], GridFunction[..., Any] | None]


class Refusal(NamedTuple):
    """Why a stored result must not be used: ``kind`` is ``"error"`` or ``"stale"``."""

    kind: str
    reason: str


def registered(name: str, fingerprint: str) -> GridFunction[..., Any] | None:
    """The function registered under ``name`` in this process (a :data:`Current`)."""
    return calls_mod.lookup(name)


def needs_function(meta: Meta, body: bytes) -> bool:
    """Whether the rules need the call's function to decide: the result is an error, or
    it waited on other functions.  Most results need neither, and no import."""
    return body[:1] == ERR or bool(meta.deps)


def refusal(
    meta: Meta, body: bytes, fn: GridFunction[..., Any], current: Current = registered
) -> Refusal | None:
    """Why the stored result ``meta``/``body`` of a call of ``fn`` must not answer it; None
    when it may.  ``current`` finds the functions it waited on (default: those registered
    in this process); one it cannot find cannot be checked, so counts as changed."""
    if body[:1] == ERR and not fn.cache_errors:
        return Refusal(
            "error",
            f"it is an error, and {fn.name} does not keep errors (cache_errors=True)",
        )
    for dep, fingerprint in meta.deps:
        now = current(dep, fingerprint)
        if now is None:
            return Refusal(
                "stale", f"it waited on {dep}, which is not loaded here (import its module)"
            )
        if now.fingerprint != fingerprint:
            return Refusal("stale", f"it waited on {dep}, which has other code now")
    return None
