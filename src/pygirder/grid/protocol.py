"""The result wire format: what a worker stores and a waiter reads.

A result envelope is one status byte followed by the codec's encoding of the value
(OK), of a value msgpack cannot carry, pickled and signed (PICKLED, only on grids
that share PYGIRDER_SECRET), or of the error's fields (ERR).  A large envelope may
travel compressed (COMPRESSED: the envelope's size in 4 bytes, little-endian, then
its lz4 block); see ``compress``.  A completion message in
a process's inbox is ``1`` or ``0`` (result inline or stored), the request id
(``ID_LEN`` characters), then the inline envelope; a worker's inbox also gets ``2``,
the id and the payload of a request a submit handed to it.  The call graph keeps a bounded
summary of each call's arguments and result.
"""

from __future__ import annotations

import dataclasses
import reprlib
from typing import TYPE_CHECKING, Any

from .. import codec, settings
from ..codec.encoding import LARGE_BUFFER
from ..errors import CodecError, PayloadTooLarge, RemoteError

if TYPE_CHECKING:
    from ..calls import Call

ID_LEN = 40
OK, PICKLED, ERR, COMPRESSED = b"O", b"P", b"E", b"Z"

#: Envelopes (and call payloads) at least this large are worth compressing.
COMPRESS_BYTES = 64 * 1024
# lz4 writes at most about 255 bytes per byte of its input: an envelope that declares
# more is malformed, whatever the size limit.
_LZ4_MAX_RATIO = 255
_LOOPBACK = ("localhost", "::1")


#: The payload a request carries through the scripts when its real payload (over
#: COMPRESS_BYTES) is stored beside it under ``Keys.argument``.  A real payload is a
#: msgpack array, so it never starts with this byte.
PAYLOAD_OUTSIDE = b"@"


def compressing(url: str) -> bool:
    """Whether values sent to the server at ``url`` are compressed (PYGIRDER_COMPRESS)."""
    mode = settings.compression()
    if mode != "auto":
        return mode == "lz4"
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    return parts.scheme != "unix" and host not in _LOOPBACK and not host.startswith("127.")


def compress(data: bytes) -> bytes:
    """``data`` (an envelope or a payload) compressed with lz4, when that saves at least
    an eighth of it; else ``data`` itself.  Incompressible values (already compressed,
    random) cost one quick pass and travel as they are."""
    if len(data) < COMPRESS_BYTES or data[:1] in (ERR, COMPRESSED):
        return data
    import lz4.block

    packed = lz4.block.compress(data, store_size=False)
    if len(packed) + 5 > len(data) - len(data) // 8:
        return data
    return COMPRESSED + len(data).to_bytes(4, "little") + packed


def expand(data: bytes, *, limit: int | None = None, what: str = "result") -> bytes:
    """The envelope (or payload) a COMPRESSED one holds, else ``data`` itself.

    Bounded for any input: the declared size must be within ``limit`` (by default the
    largest result, PYGIRDER_MAX_RESULT_BYTES) and within what lz4 can expand the
    bytes to, and the bytes must expand to exactly that size.
    """
    if data[:1] != COMPRESSED:
        return data
    if len(data) < 5:
        raise CodecError(f"cannot decode {what}: truncated compressed value")
    size = int.from_bytes(data[1:5], "little")
    most = settings.max_result_bytes() + 1 if limit is None else limit
    body = memoryview(data)[5:]
    if size > most:
        raise CodecError(
            f"cannot decode {what}: it declares {size} bytes once expanded, over the limit "
            f"of {most} (PYGIRDER_MAX_RESULT_BYTES)"
        )
    if size > _LZ4_MAX_RATIO * len(body) + 64:
        raise CodecError(
            f"cannot decode {what}: {len(body)} compressed bytes cannot expand to the "
            f"{size} it declares"
        )
    import lz4.block

    try:
        inner: bytes = lz4.block.decompress(body, uncompressed_size=size)
    except Exception as exc:  # lz4.block.LZ4BlockError: corrupt or too small a target
        raise CodecError(f"cannot decode {what}: corrupt compressed value ({exc})") from None
    if len(inner) != size or inner[:1] == COMPRESSED:
        raise CodecError(f"cannot decode {what}: corrupt compressed value")
    return inner


# The head of the OK envelope of a top-level bytes value: OK, msgpack's bin 32 marker,
# the length in 4 bytes, big-endian (values of 64 KiB and more are always bin 32).
_BIN32 = 0xC6
_BYTES_HEAD = 6


class BytesEnvelope:
    """The OK envelope of a large top-level ``bytes`` value, held as the value itself.

    The envelope of such a value is 6 bytes of head followed by the value, byte for
    byte.  Joining the two copies the value into new memory, and new memory is what
    large values cost most here: every page of it is faulted in and zeroed by the
    kernel, which took more CPU than the copies themselves.  So a worker keeps the
    value and writes the head and the value to the server as two pieces, and a reader
    makes the value from the bytes it received, with one copy.  bytes are immutable:
    every waiter and the result cache may share the one value.
    """

    __slots__ = ("head", "value")

    def __init__(self, value: bytes) -> None:
        self.value = value
        self.head = OK + bytes((_BIN32,)) + len(value).to_bytes(4, "big")

    def __len__(self) -> int:
        return len(self.head) + len(self.value)

    def __bytes__(self) -> bytes:
        return self.head + self.value

    def parts(self) -> tuple[bytes, bytes]:
        return self.head, self.value

    def __repr__(self) -> str:
        return f"<BytesEnvelope of {len(self.value)} bytes>"


#: A result envelope as processes hold it: its bytes, or a large bytes value as itself.
Envelope = bytes | bytearray | BytesEnvelope


def settle(view: memoryview) -> bytes | BytesEnvelope:
    """An envelope read into a buffer that is about to be reused, made into one this
    process can keep: a large top-level bytes value as itself (one copy, the value's
    own), anything else as a copy of its bytes (decoded when a waiter asks)."""
    size = len(view)
    if (
        size >= _BYTES_HEAD + LARGE_BUFFER
        and view[0] == OK[0]
        and view[1] == _BIN32
        and int.from_bytes(view[2:_BYTES_HEAD], "big") == size - _BYTES_HEAD
    ):
        return BytesEnvelope(bytes(view[_BYTES_HEAD:]))  # its head is the one checked
    return bytes(view)


def encode_result(
    value: Any, *, name: str, limit: int | None, request_id: str | None = None
) -> bytes | BytesEnvelope:
    """:func:`encode_ok`, except that a large top-level bytes value is held as itself
    (:class:`BytesEnvelope`): what a worker keeps and stores of a result."""
    # the limit counts the encoding without OK, as codec.encode does
    big = type(value) is bytes and len(value) >= LARGE_BUFFER
    if big and (limit is None or len(value) + _BYTES_HEAD - 1 <= limit):
        return BytesEnvelope(value)
    return encode_ok(value, name=name, limit=limit, request_id=request_id)


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


def decode_envelope(data: Envelope, request_id: str | None = None) -> Any:
    """The value of a result envelope, or raise the RemoteError it holds.

    A signed pickled result verifies only as the result of the request it was signed
    for, so ``request_id`` is required to read one.
    """
    if isinstance(data, BytesEnvelope):
        return data.value
    data = expand(data)
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
_SMALL_INT = 10 ** (_short.maxlong - 2)  # its repr is never cut by reprlib


def summarize(value: Any, limit: int = 200) -> str:
    """A bounded one-line repr for the call graph: never expensive, never huge."""
    kind = type(value)
    # what reprlib would render as the plain repr, without its dispatch (the result
    # of every call is summarized)
    if value is None or kind is bool or kind is float:
        return repr(value)
    if kind is int and -_SMALL_INT < value < _SMALL_INT:
        return repr(value)
    if kind is str and len(value) <= _short.maxstring:
        text = repr(value)
        if len(text) <= _short.maxstring and len(text) <= limit:
            return text
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
