"""The result wire format: what a worker stores and a waiter reads.

A result envelope is one status byte followed by the codec's encoding of the value
(OK), of a value msgpack cannot carry, pickled and signed (PICKLED, only on grids
that share PYGIRDER_SECRET), or of the error's fields (ERR).  A completion message in
a process's inbox is ``1`` or ``0`` (result inline or stored), the request id
(``ID_LEN`` characters), then the inline envelope.  The call graph keeps a bounded
summary of each call's arguments and result.
"""

from __future__ import annotations

import dataclasses
import reprlib
from typing import TYPE_CHECKING, Any

from .. import codec, settings
from ..errors import CodecError, PayloadTooLarge, RemoteError

if TYPE_CHECKING:
    from ..calls import Call

ID_LEN = 40
OK, PICKLED, ERR = b"O", b"P", b"E"


def encode_ok(value: Any, *, name: str, limit: int | None, request_id: str | None = None) -> bytes:
    """The OK envelope of a result; a pickled one is signed for ``request_id`` (by
    default the request the calling task runs), so it cannot pass for another's."""
    try:
        return codec.encode(value, path=f"result of {name}", limit=limit, prefix=OK)
    except PayloadTooLarge:
        raise
    except CodecError:
        pickler = settings.pickle_codec()
        if pickler is None:
            raise
        if request_id is None:
            from .context import current_request

            ctx = current_request.get()
            if ctx is None:
                raise CodecError(
                    f"cannot sign the pickled result of {name}: no request id to bind it to"
                ) from None
            request_id = ctx.request_id
        return PICKLED + pickler.encode(
            value, path=f"result of {name}", limit=limit, context=request_id
        )


def encode_error(error: RemoteError) -> bytes:
    return ERR + codec.encode(error.to_dict())


def decode_envelope(data: bytes, request_id: str | None = None) -> Any:
    """The value of a result envelope, or raise the RemoteError it holds.

    A signed pickled result verifies only as the result of the request it was signed
    for, so ``request_id`` is required to read one.
    """
    body = memoryview(data)[1:]
    kind = data[:1]
    if kind == OK:
        return codec.decode(body, path="result")
    if kind == ERR:
        raise RemoteError.from_dict(codec.decode(body, path="error"))
    if kind == PICKLED:
        pickler = settings.pickle_codec()
        if pickler is None:
            raise CodecError(
                "the result is a signed pickle, but this process has no PYGIRDER_SECRET: "
                "set the grid's shared secret to read it"
            )
        if request_id is None:
            raise CodecError("a signed pickled result can only be read with its request id")
        return pickler.decode(body, path="result", context=request_id)
    raise RemoteError("CodecError", f"unknown result envelope {bytes(data[:1])!r}")


class _ShortRepr(reprlib.Repr):
    """reprlib, with the types it would render whole first and cut after: bytes (whose
    repr of 10 MB is a 40 MB string) and dataclasses (whose repr shows every field)."""

    def repr_bytes(self, x: bytes, level: int) -> str:
        text = repr(x[: self.maxstring])
        if len(x) > self.maxstring:
            text = text[: self.maxstring - 3] + "..."
        return text

    def repr_bytearray(self, x: bytearray, level: int) -> str:
        return f"bytearray({self.repr_bytes(bytes(x[: self.maxstring + 1]), level)})"

    def repr_instance(self, x: Any, level: int) -> str:
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            if level <= 0:
                return f"{type(x).__name__}(...)"
            fields = [f for f in dataclasses.fields(x) if f.repr][: self.maxdict]
            inner = ", ".join(
                f"{f.name}={self.repr1(getattr(x, f.name, None), level - 1)}" for f in fields
            )
            return f"{type(x).__name__}({inner})"
        return super().repr_instance(x, level)


_short = _ShortRepr()
_short.maxstring = 60
_short.maxother = 60
_short.maxlevel = 3


def summarize(value: Any, limit: int = 200) -> str:
    """A bounded one-line repr for the call graph: never expensive, never huge."""
    try:
        text = _short.repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def call_summary(call: Call[Any]) -> str:
    """The call graph's argument summary: plain repr when the arguments are small."""
    if len(call.args_bytes) <= 160:
        text = repr(call.arguments)
        if len(text) <= 200:
            return text
    return summarize(call.arguments)
