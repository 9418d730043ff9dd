"""Code fingerprints and request ids: the hashes that name a call grid-wide.

A grid function is a pure function, so a call is fully named by
``["Call", qualified name, code fingerprint, bound arguments]``.  The request id is a
BLAKE2b hash over a tag and those parts, each length-prefixed so no two different
calls concatenate to the same bytes; the arguments are their canonical encoding
(``pygirder.codec``), so equal calls anywhere on the grid get equal ids, which is what
makes memoization and sharing work.

The fingerprint hashes what determines behaviour (bytecode, names, constants, the
behavioural flags), not where the code sits: line numbers, file names and the
docstring are left out, so moving a function or editing its documentation keeps its
memoized results.  Options that cannot change a result (pool, timeout, max_runtime)
never enter either hash.
"""

from __future__ import annotations

import hashlib
import types
from collections.abc import Callable
from typing import Any

__all__ = ["ID_LENGTH", "ID_TAG", "code_digest", "fingerprint", "id_hasher", "request_id"]

ID_TAG = b"pygirder-call-v1\x00"
ID_LENGTH = 40  # hex characters of a request id (BLAKE2b, 20 bytes)


def _const_repr(value: object) -> str:
    if isinstance(value, types.CodeType):
        return "code:" + code_digest(value)
    if isinstance(value, frozenset):  # iteration order of str members varies per process
        return "frozenset(" + ",".join(sorted(_const_repr(v) for v in value)) + ")"
    if isinstance(value, tuple):
        return "(" + ",".join(_const_repr(v) for v in value) + ")"
    return f"{type(value).__name__}:{value!r}"


def code_digest(code: types.CodeType, doc: str | None = None) -> str:
    """The behaviour of a code object: ``doc``, if it is the first constant, is left out."""
    consts = list(code.co_consts)
    if doc is not None and consts and consts[0] == doc:
        consts = consts[1:]
    parts = [
        code.co_code.hex(),
        repr(code.co_names),
        repr(code.co_varnames),
        repr(code.co_freevars),
        repr(code.co_cellvars),
        # only the behavioural flags: __future__ compiler flags sit above bit 16
        repr(
            (
                code.co_argcount,
                code.co_posonlyargcount,
                code.co_kwonlyargcount,
                code.co_flags & 0xFFFF,
            )
        ),
        "|".join(_const_repr(c) for c in consts),
    ]
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=16).hexdigest()


def fingerprint(func: Callable[..., Any]) -> str:
    """The code fingerprint of a plain function (bytecode, constants, names)."""
    return code_digest(func.__code__, func.__doc__)


def id_hasher(name: str, fingerprint: str) -> Any:
    """The id hash fed with everything but the arguments: a caller that names many calls
    of one function copies it (``.copy()``) and adds each call's arguments."""
    h = hashlib.blake2b(ID_TAG, digest_size=ID_LENGTH // 2)
    for part in (name.encode(), fingerprint.encode()):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h


def request_id(name: str, fingerprint: str, args_bytes: bytes) -> str:
    """The id of a call: its function's name and fingerprint, and its encoded arguments."""
    h = id_hasher(name, fingerprint)
    h.update(args_bytes)
    return str(h.hexdigest())
