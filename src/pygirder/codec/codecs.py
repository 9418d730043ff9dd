"""The codec interface, the canonical msgpack codec and the module-level
``encode``/``decode`` that request ids are computed with.
"""

from __future__ import annotations

from typing import Any

import msgpack

from ..errors import CodecError
from .decoding import _decode, _Refused
from .encoding import (
    _check_limit,
    _check_size,
    _enc,
    _format_path,
    _large_parts,
    _packers,
    _short_repr,
    _type_name,
    _Unencodable,
)
from .wire import MAX_DEPTH


class Codec:
    """Turns values into bytes and back; subclasses name themselves with ``name``."""

    name: str = ""

    def encode(self, value: Any, *, path: str = "value", limit: int | None = None) -> bytes:
        """Encode ``value``; ``path`` names it in errors, ``limit`` caps the size."""
        raise NotImplementedError

    def decode(self, data: bytes, *, path: str = "value") -> Any:
        """Decode bytes made by :meth:`encode`; anything else raises CodecError."""
        raise NotImplementedError


class MsgpackCodec(Codec):
    """The safe, canonical default: msgpack plus tagged extension types (module doc)."""

    name = "msgpack"

    def encode(
        self, value: Any, *, path: str = "value", limit: int | None = None, prefix: bytes = b""
    ) -> bytes:
        """Encode ``value`` canonically; errors name ``path`` plus where inside it.
        ``prefix`` goes in front of the encoding (not counted against ``limit``): an
        envelope marker costs no extra copy of a large value."""
        parts = _large_parts(value, _packers.packer)
        if parts is not None:
            _check_size(sum(len(part) for part in parts), path, limit)
            return b"".join([prefix, *parts])
        try:
            data = _enc(value, _packers.packer, 0)
        except _Unencodable as exc:
            where = _format_path(path, exc.segments)
            shown = where if len(where) <= 240 else f"{where[:80]} ... {where[-140:]}"
            raise CodecError(f"cannot encode {shown}: {exc.reason}", path=where) from None
        except RecursionError:
            # Only reachable when called already deep in the stack: MAX_DEPTH keeps
            # the walk itself well inside the default recursion limit.
            raise CodecError(
                f"cannot encode {path}: nested too deeply for the remaining stack; "
                "flatten the structure",
                path=path,
            ) from None
        _check_limit(data, path, limit)
        return prefix + data if prefix else data

    def decode(self, data: bytes, *, path: str = "value") -> Any:
        """Decode canonical bytes; garbage, truncation or an unknown class is a CodecError."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise CodecError(
                f"cannot decode {path}: expected bytes, got {_type_name(data)}", path=path
            )
        try:
            return _decode(data)
        except _Refused as exc:
            raise CodecError(f"cannot decode {path}: {exc}", path=path) from None
        except RecursionError:
            raise CodecError(
                f"cannot decode {path}: nested too deeply for the remaining stack", path=path
            ) from None
        except msgpack.StackError:
            raise CodecError(
                f"cannot decode {path}: lists or dicts nested more than msgpack's 1024 levels "
                f"(values are at most {MAX_DEPTH} deep)",
                path=path,
            ) from None
        except Exception as exc:  # garbage may fail in any way msgpack or a hook can
            raise CodecError(
                f"cannot decode {path}: not a valid pygirder message "
                f"({type(exc).__name__}: {_short_repr(str(exc), 200)})",
                path=path,
            ) from None


_default_codec = MsgpackCodec()


def encode(
    value: Any, *, path: str = "value", limit: int | None = None, prefix: bytes = b""
) -> bytes:
    """Encode ``value`` with the canonical msgpack codec (see :class:`MsgpackCodec`)."""
    return _default_codec.encode(value, path=path, limit=limit, prefix=prefix)


def decode(data: bytes, *, path: str = "value") -> Any:
    """Decode bytes made by :func:`encode`."""
    return _default_codec.decode(data, path=path)
