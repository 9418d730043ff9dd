"""Values to canonical bytes: equal values give equal bytes, and whatever is not
data is refused with the path to where it sits in the value.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
import sys
import threading
import types
from typing import Any

import msgpack

from ..errors import PayloadTooLarge
from .registry import _BY_CLASS, _INIT_FIELDS
from .wire import (
    _CANONICAL_NAN,
    _EXT_BIGINT,
    _EXT_DATACLASS,
    _EXT_FROZENSET,
    _EXT_NDARRAY,
    _EXT_SET,
    _EXT_TUPLE,
    _INT64_MIN,
    _PLAIN_DATA,
    _SCALARS,
    _STR_ONLY,
    _UINT64_END,
    MAX_DEPTH,
)


class _Unencodable(Exception):
    """Raised deep in the walk; containers add their path segment on the way out."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.segments: list[str] = []  # innermost first


def _short_repr(obj: Any, limit: int = 60) -> str:
    try:
        text = repr(obj)
    except Exception:
        text = f"<{type(obj).__qualname__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(obj: Any) -> str:
    t = type(obj)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _big_int_bytes(value: int) -> bytes:
    bits = (~value if value < 0 else value).bit_length() + 1  # one more for the sign
    return value.to_bytes((bits + 7) // 8, "big", signed=True)


def _pack_default(obj: Any) -> Any:
    # Called by msgpack for what it does not pack natively.  The walk below hands it
    # only containers of _SCALARS, so the one thing that can land here is an int
    # outside the 64-bit range.
    if type(obj) is int:
        return msgpack.ExtType(_EXT_BIGINT, _big_int_bytes(obj))
    raise TypeError(f"cannot serialize {type(obj).__qualname__!r}")


class _Packers(threading.local):
    """One msgpack Packer per thread: packers keep a buffer and are not thread-safe."""

    def __init__(self) -> None:
        self.packer = msgpack.Packer(
            use_bin_type=True, strict_types=True, use_single_float=False, default=_pack_default
        )


_packers = _Packers()


def _is_plain(items: Any) -> bool:
    """Whether msgpack can pack every item of ``items`` canonically on its own.

    Small containers are checked with a loop; big ones with ``map`` and ``set``,
    which run in C at a few nanoseconds per element.  Among the scalar types,
    ``x != x`` is true only for NaN.
    """
    if len(items) <= 8:
        for item in items:
            kind = type(item)
            if kind not in _SCALARS or (kind is float and item != item):
                return False
        return True
    kinds = set(map(type, items))
    if not kinds <= _SCALARS:
        return False
    return float not in kinds or not any(map(operator.ne, items, items))


_FIXEXT = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}


def _ext(code: int, payload: bytes) -> bytes:
    """The msgpack extension ``code`` holding ``payload`` (what msgpack itself emits)."""
    size = len(payload)
    fix = _FIXEXT.get(size)
    if fix is not None:
        return bytes((fix, code)) + payload
    if size < 0x100:
        return bytes((0xC7, size, code)) + payload
    if size < 0x10000:
        return b"\xc8" + size.to_bytes(2, "big") + bytes((code,)) + payload
    return b"\xc9" + size.to_bytes(4, "big") + bytes((code,)) + payload


def _unsupported(value: Any) -> _Unencodable:
    """Explain why ``value`` cannot be encoded and what to pass instead."""
    t = type(value)
    tname = _type_name(value)
    if t is types.LambdaType and value.__name__ == "<lambda>":
        return _Unencodable(
            "a lambda is code, not data; define a module-level function and pass its "
            "name or a grid function call instead"
        )
    if isinstance(value, type):
        return _Unencodable(
            f"class {value.__qualname__} is code, not data; pass its name as a str, or an "
            "instance of it registered with @pygirder.register"
        )
    if isinstance(value, types.FunctionType | types.BuiltinFunctionType | types.MethodType):
        return _Unencodable(
            f"{tname} {getattr(value, '__qualname__', '')} is code, not data; define a "
            "module-level function and pass its name or a grid function call instead"
        )
    if isinstance(value, types.ModuleType):
        return _Unencodable(f"module {value.__name__} is code, not data; pass its name instead")
    if t in (bytearray, memoryview):
        return _Unencodable(
            f"{tname} is a mutable buffer, not a canonical value; pass bytes(...) instead"
        )
    if isinstance(value, types.GeneratorType | types.CoroutineType | types.AsyncGeneratorType):
        return _Unencodable(
            f"{tname} is a lazy computation, not data; pass list(...) of its items instead"
        )
    if isinstance(value, range | type({}.keys()) | type({}.values()) | type({}.items())):
        return _Unencodable(f"{tname} is a view, not data; pass list(...) or tuple(...) instead")
    if dataclasses.is_dataclass(value):
        return _Unencodable(
            f"dataclass {tname} is not registered; decorate it with @pygirder.register "
            "(and import its module wherever the value is decoded)"
        )
    if isinstance(value, enum.Enum):
        return _Unencodable(f"{tname} is an enum member; pass its .value instead")
    for base, how in (
        (int, "int(...)"),
        (float, "float(...)"),
        (str, "str(...)"),
        (bytes, "bytes(...)"),
        (list, "list(...)"),
        (tuple, "tuple(...) or a registered @dataclass"),
        (dict, "dict(...)"),
        (set, "set(...)"),
        (frozenset, "frozenset(...)"),
    ):
        if isinstance(value, base):
            return _Unencodable(
                f"{tname} is a subclass of {base.__name__}, which would not survive the "
                f"round trip; convert it with {how}"
            )
    return _Unencodable(f"{tname} is not supported; {_PLAIN_DATA}")


def _encode_numpy(value: Any, np: Any, p: msgpack.Packer, depth: int) -> bytes:
    if isinstance(value, np.generic):
        item = value.item()
        if type(item) in _SCALARS:
            return _enc(item, p, depth)
        raise _Unencodable(
            f"numpy scalar {_type_name(value)} has no plain Python equivalent; "
            "convert it yourself (e.g. str(...) or float(...))"
        )
    if type(value) is not np.ndarray:
        raise _Unencodable(f"{_type_name(value)} is not supported; pass a plain numpy.ndarray")
    dtype = value.dtype
    if dtype.hasobject or dtype.fields is not None:
        raise _Unencodable(
            f"numpy array of dtype {dtype} holds Python objects or records; "
            "pass a numeric/str/bytes array, or a list of its items"
        )
    if dtype.byteorder == ">":  # one byte order for equal arrays
        dtype = dtype.newbyteorder("<")
        value = value.astype(dtype)
    if dtype.kind in "fc":
        nans = np.isnan(value)
        if nans.any():
            value = np.array(value, copy=True)
            parts = (value,) if dtype.kind == "f" else (value.real, value.imag)
            for part in parts:
                part[np.isnan(part)] = np.nan
    data = np.ascontiguousarray(value).tobytes()
    return _ext(_EXT_NDARRAY, p.pack([dtype.str, list(value.shape), data]))


def _enc(value: Any, p: msgpack.Packer, depth: int) -> bytes:
    """Encode ``value`` canonically (one Python frame per nesting level)."""
    t = type(value)
    if t is str or t is bytes or t is bool or value is None:
        try:
            return p.pack(value)
        except UnicodeEncodeError:
            raise _Unencodable(
                "str contains lone surrogates, which are not valid UTF-8; "
                "clean it, or pass it as bytes with .encode('utf-8', 'surrogatepass')"
            ) from None
    if t is int:
        if _INT64_MIN <= value < _UINT64_END:
            return p.pack(value)
        return _ext(_EXT_BIGINT, _big_int_bytes(value))
    if t is float:
        return p.pack(_CANONICAL_NAN if value != value else value)
    if depth >= MAX_DEPTH:
        raise _Unencodable(
            f"nested more than {MAX_DEPTH} levels deep (or contains a reference cycle); "
            "flatten the structure"
        )
    depth += 1

    if t is list or t is tuple:
        payload = None
        if _is_plain(value):
            try:
                payload = p.pack(value if t is list else list(value))
            except Exception:  # e.g. a lone surrogate: the walk below names the item
                payload = None
        if payload is None:
            chunks = [p.pack_array_header(len(value))]
            i = 0
            try:
                for i, item in enumerate(value):  # noqa: B007 - i is read on failure
                    chunks.append(_enc(item, p, depth))
            except _Unencodable as exc:
                exc.segments.append(f"[{i}]")
                raise
            payload = b"".join(chunks)
        return payload if t is list else _ext(_EXT_TUPLE, payload)

    if t is dict:
        # Entries are sorted, so insertion order never matters.  All-str keys (the
        # common case) sort by the keys themselves: code point order is UTF-8 byte
        # order.  Other dicts sort by the encoded bytes of each entry.  Equal dicts
        # have the same key types, so they always take the same branch.
        key: Any = None
        try:
            if set(map(type, value)) <= _STR_ONLY:
                keys = sorted(value)
                vals = list(map(value.__getitem__, keys))
                if _is_plain(vals):
                    try:
                        return p.pack(dict(zip(keys, vals, strict=True)))
                    except Exception:
                        pass  # e.g. a lone surrogate: the walk below names the entry
                chunks = [p.pack_map_header(len(keys))]
                for key, item in zip(keys, vals, strict=True):
                    try:
                        chunks.append(_enc(key, p, depth))
                    except _Unencodable as exc:
                        exc.reason = f"the dict key itself: {exc.reason}"
                        raise
                    chunks.append(_enc(item, p, depth))
                return b"".join(chunks)
            entries = []
            for key, item in value.items():
                try:
                    key_bytes = _enc(key, p, depth)
                except _Unencodable as exc:
                    exc.reason = f"the dict key itself: {exc.reason}"
                    raise
                entries.append((key_bytes, _enc(item, p, depth)))
            # Sorting (key, value) byte pairs stays canonical even for two NaN keys.
            entries.sort()
            chunks = [p.pack_map_header(len(entries))]
            for key_bytes, item_bytes in entries:
                chunks.append(key_bytes)
                chunks.append(item_bytes)
            return b"".join(chunks)
        except _Unencodable as exc:
            exc.segments.append(f"[{_short_repr(key)}]")
            raise

    if t is set or t is frozenset:
        members: list[bytes] | None = None
        if _is_plain(value):
            try:
                members = sorted(map(p.pack, value))
            except Exception:
                members = None
        if members is None:
            members = []
            member = None
            try:
                for member in value:
                    members.append(_enc(member, p, depth))
            except _Unencodable as exc:
                exc.segments.append("{" + _short_repr(member) + "}")
                raise
            members.sort()
        members.insert(0, p.pack_array_header(len(members)))
        code = _EXT_SET if t is set else _EXT_FROZENSET
        return _ext(code, b"".join(members))

    name = _BY_CLASS.get(t)
    if name is not None:
        fields = _INIT_FIELDS[t]
        chunks = [p.pack_array_header(2), p.pack(name), p.pack_map_header(len(fields))]
        field = ""
        try:
            for field in fields:
                try:
                    item = getattr(value, field)
                except AttributeError:
                    raise _Unencodable(
                        "the dataclass instance has no value for this init field"
                    ) from None
                chunks.append(p.pack(field))
                chunks.append(_enc(item, p, depth))
        except _Unencodable as exc:
            exc.segments.append(f".{field}")
            raise
        return _ext(_EXT_DATACLASS, b"".join(chunks))

    if t.__module__ == "numpy":
        np = sys.modules.get("numpy")
        if np is not None:
            return _encode_numpy(value, np, p, depth)
    raise _unsupported(value)


def _format_path(root: str, segments: list[str]) -> str:
    return root + "".join(reversed(segments))


def _fmt_size(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _check_limit(data: bytes, path: str, limit: int | None) -> bytes:
    _check_size(len(data), path, limit)
    return data


def _check_size(size: int, path: str, limit: int | None) -> None:
    if limit is not None and size > limit:
        raise PayloadTooLarge(
            f"{path} is {_fmt_size(size)} ({size} bytes) encoded, over the limit of "
            f"{_fmt_size(limit)} ({limit} bytes); raise the limit with "
            "pygirder.connect(max_arg_bytes=...) for arguments or max_result_bytes=... for "
            "results, or store big data elsewhere (a file, S3, a Redis key) and pass a "
            "reference to it",
            path=path,
            size=size,
            limit=limit,
        )


# Top-level bytes and numpy arrays of at least this many bytes are encoded as a list of
# parts joined once, their data read through the buffer protocol: a 10 MB result is
# copied once instead of three or four times (msgpack's buffer, the extension wrapper,
# the envelope).  The bytes are exactly what the general path produces.
LARGE_BUFFER = 64 * 1024


def _bin_header(size: int) -> bytes:
    if size < 0x100:
        return bytes((0xC4, size))
    if size < 0x10000:
        return b"\xc5" + size.to_bytes(2, "big")
    return b"\xc6" + size.to_bytes(4, "big")


def _ext_header(code: int, size: int) -> bytes:
    """The header ``_ext`` puts before a payload of ``size`` bytes (not a fixext one)."""
    if size < 0x100:
        return bytes((0xC7, size, code))
    if size < 0x10000:
        return b"\xc8" + size.to_bytes(2, "big") + bytes((code,))
    return b"\xc9" + size.to_bytes(4, "big") + bytes((code,))


def _large_parts(value: Any, p: msgpack.Packer) -> list[Any] | None:
    """The encoding of a large top-level bytes or numpy array as parts, or None for
    anything else (which takes the general path, errors included)."""
    t = type(value)
    if t is bytes:
        if len(value) < LARGE_BUFFER:
            return None
        return [_bin_header(len(value)), value]
    if t.__module__ != "numpy":
        return None
    np: Any = sys.modules.get("numpy")
    if np is None or t is not np.ndarray or value.nbytes < LARGE_BUFFER:
        return None
    dtype = value.dtype
    if dtype.hasobject or dtype.fields is not None or dtype.byteorder == ">":
        return None
    if dtype.kind in "fc" and np.isnan(value).any():
        return None  # NaNs are made canonical on the general path
    data = np.ascontiguousarray(value)
    try:
        buffer: Any = memoryview(data).cast("B")
    except (TypeError, ValueError):  # a dtype without a buffer format (datetime64...)
        buffer = data.tobytes()
    head = p.pack_array_header(3) + p.pack(dtype.str) + p.pack(list(value.shape))
    head += _bin_header(len(buffer))
    return [_ext_header(_EXT_NDARRAY, len(head) + len(buffer)), head, buffer]
