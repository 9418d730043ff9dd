"""Canonical encoding of arguments and results: equal values give equal bytes.

A call's request id is a hash of its encoded arguments, so the encoding must be
*canonical*: two equal values (of the same types) must always produce the same
bytes, whatever the dict insertion order, set iteration order, hash seed or NaN
bit pattern.  The default :class:`MsgpackCodec` is safe (decoding never runs user
code other than a registered dataclass's ``__init__``, ``__hash__`` and ``__eq__``)
and canonical:

- ``None``, ``bool``, ``int``, ``float`` (always float64, one NaN), ``str``, ``bytes``
  and ``list`` are plain msgpack; ``dict`` is a msgpack map whose entries are sorted;
- tuples, sets, frozensets, ints outside 64 bits, registered dataclasses and numpy
  arrays are msgpack extension types (tagged, so ``(1,)``, ``[1]`` and ``{1}`` never
  collide); set members are sorted by their encoded bytes.

Decoding is bounded for any bytes: a message decodes, or fails with a CodecError, in
time and memory about linear in its size, at any nesting and on a small thread stack
(see the limits under "decoding" below).

Anything else (functions, lambdas, arbitrary objects, generators, subclasses of
the built-in types) is refused with a :class:`~pygirder.errors.CodecError` naming
where in the value it sits (``args.x[2]['k']``) and what to pass instead.

:class:`PickleCodec` is an opt-in transport for payloads and results on a grid
whose members share a secret; request ids are always computed with the msgpack
codec, so pickling never affects which calls are considered equal.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import math
import operator
import pickle
import re
import struct
import sys
import threading
import types
from collections.abc import Callable
from typing import Any, TypeVar, overload

import msgpack

from .errors import CodecError, ConfigError, GridFunctionError, PayloadTooLarge

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_DEPTH",
    "MAX_EMPTY_ITEMS",
    "MAX_HASH_COLLISIONS",
    "MAX_NDIM",
    "VERSION",
    "Codec",
    "MsgpackCodec",
    "PickleCodec",
    "decode",
    "encode",
    "register",
]

#: Version of the wire format (extension types, envelopes).  Results kept in the
#: durable store record it; bump it with any change that makes old bytes decode
#: differently, so stored results of the old format are recomputed, never misread.
VERSION = 1

#: Size limits in bytes of one encoded value.  Redis strings hold at most 512 MB.
DEFAULT_LIMITS: dict[str, int] = {
    "max_arg_bytes": 64 * 1024 * 1024,
    "max_result_bytes": 512 * 1024 * 1024 - 1,
}

#: Deepest nesting of containers accepted.  Deeper values (or reference cycles) are
#: refused with a CodecError instead of exhausting the interpreter's stack.
MAX_DEPTH = 500

# Extension type codes.  They are part of the wire format and of every request id:
# never renumber them.
_EXT_BIGINT = 1  # signed big-endian two's complement, minimal length
_EXT_TUPLE = 2  # payload: msgpack array of the items
_EXT_SET = 3  # payload: msgpack array of the members' encodings, sorted bytewise
_EXT_FROZENSET = 4  # same as set
_EXT_DATACLASS = 5  # payload: msgpack array [registered name, {field: value}]
_EXT_NDARRAY = 6  # payload: msgpack array [dtype.str, shape, C-order bytes]

_INT64_MIN = -(2**63)
_UINT64_END = 2**64
_INT64_END = 2**63

# One bit pattern for every NaN: msgpack stores a float's 64 bits as they are, and
# NaNs computed in different ways differ in sign and payload bits.
_CANONICAL_NAN: float = struct.unpack(">d", b"\x7f\xf8\x00\x00\x00\x00\x00\x00")[0]

# Types msgpack packs canonically by itself, so a container holding only these can
# be handed to msgpack whole (floats need a NaN check first; big ints go through
# the packer's ``default`` hook).
_SCALARS = frozenset({type(None), bool, int, float, str, bytes})
_STR_ONLY = frozenset({str})

_PLAIN_DATA = (
    "pass plain data (None, bool, int, float, str, bytes, list, tuple, dict, set, "
    "frozenset, numpy arrays) or register the dataclass with @pygirder.register"
)


# --------------------------------------------------------------------------- registry

_BY_NAME: dict[str, type] = {}
_BY_CLASS: dict[type, str] = {}
_INIT_FIELDS: dict[type, tuple[str, ...]] = {}
_registry_lock = threading.Lock()

T = TypeVar("T", bound=type)


def _default_name(cls: type) -> str:
    # Worker processes load the user's script as ``__mp_main__`` (as multiprocessing's
    # spawn does), while the client ran it as ``__main__``: both must use one name.
    module = cls.__module__
    if module == "__mp_main__":
        module = "__main__"
    return f"{module}:{cls.__qualname__}"


@overload
def register(cls: T, /, *, name: str | None = None) -> T: ...
@overload
def register(cls: None = None, /, *, name: str | None = None) -> Callable[[T], T]: ...
def register(cls: Any = None, /, *, name: str | None = None) -> Any:
    """Let a ``@dataclass`` travel through the codec: ``@pygirder.register`` above it.

    Encoded instances carry the registered ``name`` (by default ``"module:QualName"``)
    and are rebuilt on decode by calling the class with its init fields, so the
    decoding process must have imported the module that registers the class.
    Registering the same class again is harmless; another class under a name already
    taken is an error, because decoding could no longer tell them apart.  A class
    defined in a script gets the module name ``__main__`` in every process, also in
    workers that load the script as ``__mp_main__``.
    """

    def decorate(klass: T) -> T:
        if not (isinstance(klass, type) and dataclasses.is_dataclass(klass)):
            what = getattr(klass, "__qualname__", repr(klass))
            raise GridFunctionError(
                f"cannot register {what}: only dataclasses can be registered with the codec; "
                "decorate the class with @dataclass (frozen or not) below @pygirder.register"
            )
        key = name if name is not None else _default_name(klass)
        with _registry_lock:
            existing = _BY_NAME.get(key)
            if existing is not None and existing is not klass:
                raise GridFunctionError(
                    f"cannot register {klass.__module__}.{klass.__qualname__} as {key!r}: that "
                    f"name is already taken by {existing.__module__}.{existing.__qualname__}; "
                    "pass another name with @pygirder.register(name=...)"
                )
            old_name = _BY_CLASS.get(klass)
            if old_name is not None and old_name != key:
                raise GridFunctionError(
                    f"cannot register {klass.__qualname__} as {key!r}: it is already "
                    f"registered as {old_name!r}; a class has one name on the grid"
                )
            _BY_NAME[key] = klass
            _BY_CLASS[klass] = key
            # Sorted: fields are encoded as a canonical (sorted) map.
            _INIT_FIELDS[klass] = tuple(sorted(f.name for f in dataclasses.fields(klass) if f.init))
        return klass

    if cls is None:
        return decorate
    return decorate(cls)


# --------------------------------------------------------------------------- encoding


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


# --------------------------------------------------------------------------- decoding

# Decoding is bounded for any input: a message of N bytes decodes, or fails with a
# CodecError, in time and memory roughly linear in N.  Each limit below stops one
# way a small message could cost far more than its size.

#: Most dimensions of a decoded numpy array (numpy's own limit).
MAX_NDIM = 64

#: Most items of a decoded numpy array whose items take no bytes (dtype ``V0``).
#: Such arrays arrive with no data at all, yet copying or iterating them takes time
#: in proportion to their item count.
MAX_EMPTY_ITEMS = 1 << 20

#: Most decoded values (big ints, tuples, frozensets, dataclasses) that may share
#: their hash with an unequal one.  Python's int and tuple hashes are not randomized,
#: so a crafted message can hold thousands of distinct set members or dict keys with
#: one hash, and building the set or dict would take time quadratic in their number.
#: Canonical values essentially never have such collisions.  (str and bytes hashes
#: are randomized; ints and floats in msgpack's range share one hash only a few
#: dozen at a time.)
MAX_HASH_COLLISIONS = 256

# dtype strings as ``numpy.dtype.str`` writes them for the arrays the encoder takes
# (byte order, kind, item size, datetime unit); anything else is refused before
# numpy parses it.
_DTYPE_STR = re.compile(r"[<>|=][?a-zA-Z][0-9]{1,10}(?:\[[0-9]{0,10}[a-zA-Z]{1,2}\])?")

# How many extension levels are unpacked recursively, with ``msgpack.unpackb``
# called from the extension hook.  It keeps its parser state (about 40 KiB) on the C
# stack, and every level adds interpreter frames, so a crafted message nesting a few
# hundred extensions would overflow a thread's stack and crash the process.  Deeper
# levels are unpacked one after the other (``_Decoder.decode_deep``), in constant
# stack but at about twice the cost per extension.  With 2, any value decodes in a
# thread with a 192 KiB stack (with 3 it took 256 KiB, with 1 160 KiB).
_STACK_UNPACK_LEVELS = 2

# Values with a bigger payload are not tracked for collisions: a message of N bytes
# holds at most N / _TRACKED_PAYLOAD of them, too few to matter, and hashing them at
# every level of a deep nesting would cost more than the payload's size.
_TRACKED_PAYLOAD = 4096

# Marks a hash shared by unequal values in ``_Decoder.hashes``.
_COLLIDED = object()


class _Refused(Exception):
    """A well-formed message this process cannot turn into a value (a clear CodecError)."""


def _too_many_collisions() -> _Refused:
    return _Refused(
        f"more than {MAX_HASH_COLLISIONS} of its values share their hash with unequal ones; "
        "canonical messages never do: the message was crafted to make building its sets "
        "and dicts slow"
    )


class _Deferred:
    """An extension value nested too deep to unpack recursively, until it is built."""

    __slots__ = ("code", "data", "depth", "item", "nested", "size", "value")

    def __init__(self, code: int, data: bytes | None, depth: int) -> None:
        self.code = code
        self.data = data
        self.size = len(data) if data is not None else 0
        self.depth = depth
        self.item: Any = None
        self.nested = False
        self.value: Any = None


class _Decoder:
    """The state of one decode, which msgpack's hooks have no other way to reach."""

    __slots__ = ("collisions", "deferred", "depth", "ext_hook", "hashes")

    def __init__(self) -> None:
        self.depth = 0  # extension nesting of the payload being unpacked
        self.hashes: dict[int, Any] = {}  # hash -> first value with it, or _COLLIDED
        self.collisions = 0  # values whose hash an unequal value had already
        self.deferred: list[_Deferred] = []  # what defer_hook put off
        self.ext_hook = self.hook  # one bound method for every unpackb

    def hook(self, code: int, data: bytes) -> Any:
        if code == _EXT_TUPLE:  # the common case, inlined
            depth = self.depth
            if depth >= _STACK_UNPACK_LEVELS:
                return self.decode_deep(code, data)
            self.depth = depth + 1
            try:
                # msgpack bounds every declared length by the size of ``data`` itself.
                item = msgpack.unpackb(
                    data, raw=False, strict_map_key=False, ext_hook=self.ext_hook
                )
            finally:
                self.depth = depth
            if type(item) is not list:
                raise ValueError("malformed tuple extension")
            value = tuple(item)
            if len(data) <= _TRACKED_PAYLOAD:
                try:
                    first = self.hashes.setdefault(hash(value), value)
                except TypeError:  # unhashable: neither a set member nor a dict key
                    return value
                if first is not value and (first is _COLLIDED or first != value):
                    self.collide(value)
            return value
        if code == _EXT_BIGINT:
            # int.from_bytes is linear in the size; printing a huge int is bounded by
            # Python's own limit on int-to-str conversions (sys.set_int_max_str_digits).
            if not data:
                raise ValueError("empty big int")
            number = int.from_bytes(data, "big", signed=True)
            if len(data) <= _TRACKED_PAYLOAD:
                first = self.hashes.setdefault(hash(number), number)
                if first is not number and (first is _COLLIDED or first != number):
                    self.collide(number)
            return number
        if not _EXT_TUPLE < code <= _EXT_NDARRAY:
            raise ValueError(f"unknown msgpack extension type {code}")
        depth = self.depth
        if depth >= _STACK_UNPACK_LEVELS:
            return self.decode_deep(code, data)
        self.depth = depth + 1
        try:
            item = msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=self.ext_hook)
        finally:
            self.depth = depth
        return self.build(code, item, len(data))

    def collide(self, value: Any) -> None:
        """Count ``value``, whose hash an unequal value had: a crafted message has many.

        A value landing on a hash shared by unequal values counts even when it equals
        one of them: looking it up in a set or dict still walks past all of them.
        """
        self.hashes[hash(value)] = _COLLIDED
        self.collisions += 1
        if self.collisions > MAX_HASH_COLLISIONS:
            raise _too_many_collisions()

    def build(self, code: int, item: Any, size: int) -> Any:
        """The value of extension ``code`` from its unpacked payload ``item`` of ``size`` bytes."""
        if code == _EXT_NDARRAY:
            return _decode_ndarray(item)
        if code == _EXT_DATACLASS:
            value = _decode_dataclass(item)
        elif type(item) is not list:
            raise ValueError("malformed tuple or set extension")
        elif code == _EXT_TUPLE:
            value = tuple(item)
        else:
            try:
                if code == _EXT_SET:
                    return set(item)
                value = frozenset(item)
            except TypeError as exc:
                raise _Refused(f"a set member is unhashable ({exc})") from None
        if size <= _TRACKED_PAYLOAD:
            try:
                first = self.hashes.setdefault(hash(value), value)
            except TypeError:
                return value
            if first is not value and (first is _COLLIDED or first != value):
                self.collide(value)
        return value

    def defer_hook(self, code: int, data: bytes) -> Any:
        if code == _EXT_BIGINT:
            return self.hook(code, data)
        if not _EXT_TUPLE <= code <= _EXT_NDARRAY:
            raise ValueError(f"unknown msgpack extension type {code}")
        node = _Deferred(code, data, 0)
        self.deferred.append(node)
        return node

    def decode_deep(self, code: int, data: bytes) -> Any:
        """Decode a deeply nested extension without recursion.

        Each payload is unpacked with a hook that leaves nested extensions as
        placeholders; then placeholders are built innermost first and put in place.
        The stack stays flat at any depth, and each payload is still parsed by msgpack.
        """
        root = _Deferred(code, data, self.depth)
        order = [root]
        for node in order:  # grows while it is walked: breadth first
            found: list[_Deferred] = []
            self.deferred = found
            node.item = msgpack.unpackb(
                node.data, raw=False, strict_map_key=False, ext_hook=self.defer_hook
            )
            node.data = None  # each level's payload is a copy of the rest: keep one
            if found:
                if node.depth + 1 >= MAX_DEPTH:
                    raise ValueError(f"extensions nested more than {MAX_DEPTH} levels deep")
                for child in found:
                    child.depth = node.depth + 1
                node.nested = True
                order.extend(found)
        self.deferred = []
        for node in reversed(order):
            item = node.item
            node.item = None
            if node.nested:
                item = _fill(item)
            node.value = self.build(node.code, item, node.size)
        return root.value


def _fill(root: Any) -> Any:
    """Replace every placeholder inside ``root`` (lists and dicts) by its value."""
    if type(root) is _Deferred:
        return root.value
    todo = [root]
    while todo:
        container = todo.pop()
        if type(container) is list:
            if len(container) > 8 and set(map(type, container)).isdisjoint(_NESTING):
                continue
            for i, item in enumerate(container):
                kind = type(item)
                if kind is _Deferred:
                    container[i] = item.value
                elif kind is list or kind is dict:
                    todo.append(item)
        else:
            if any(type(key) is _Deferred for key in container):
                pairs = [
                    (key.value if type(key) is _Deferred else key, item)
                    for key, item in container.items()
                ]
                container.clear()
                container.update(pairs)
            for key, item in container.items():
                kind = type(item)
                if kind is _Deferred:
                    container[key] = item.value
                elif kind is list or kind is dict:
                    todo.append(item)
    return root


_NESTING = frozenset({_Deferred, list, dict})


def _decode_dataclass(item: Any) -> Any:
    if not (type(item) is list and len(item) == 2 and type(item[0]) is str):
        raise ValueError("malformed dataclass extension")
    name, fields = item
    if type(fields) is not dict:
        raise ValueError("malformed dataclass extension")
    cls = _BY_NAME.get(name)
    if cls is None:
        raise _Refused(
            f"dataclass {_short_repr(name, 200)} is not registered in this process; import the "
            f"module that defines and registers it (module "
            f"{_short_repr(name.partition(':')[0], 200)}, with @pygirder.register) before decoding"
        )
    known = _INIT_FIELDS[cls]
    unknown = [key for key in fields if key not in known]
    if unknown:
        shown = ", ".join(_short_repr(key, 40) for key in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise _Refused(
            f"cannot rebuild dataclass {name!r}: the message has fields it does not have "
            f"({shown}{more}; its init fields are {list(known)}); do the sender and this "
            "process run the same version of the class?"
        )
    try:
        return cls(**fields)
    except Exception as exc:
        raise _Refused(
            f"cannot rebuild dataclass {name!r} from fields {sorted(fields)}: "
            f"{type(exc).__name__}: {_short_repr(str(exc), 200)}; do the sender and this "
            "process run the same version of the class?"
        ) from exc


def _decode_ndarray(item: Any) -> Any:
    if not (type(item) is list and len(item) == 3):
        raise ValueError("malformed ndarray extension")
    dtype_str, shape, data = item
    if type(dtype_str) is not str or type(shape) is not list or type(data) is not bytes:
        raise ValueError("malformed ndarray extension")
    # Everything is checked before numpy sees it: numpy's own checks can be slow
    # (a product of thousands of huge dimensions) or allocate first.
    if len(shape) > MAX_NDIM:
        raise ValueError(f"ndarray of {len(shape)} dimensions; numpy has at most {MAX_NDIM}")
    if not all(type(n) is int and 0 <= n < _INT64_END for n in shape):
        raise ValueError("malformed ndarray shape")
    if _DTYPE_STR.fullmatch(dtype_str) is None:
        raise ValueError(f"malformed ndarray dtype {_short_repr(dtype_str)}")
    np: Any = sys.modules.get("numpy")
    if np is None:
        try:
            import numpy as np
        except ImportError:
            raise _Refused(
                "the value holds a numpy array but numpy is not installed here; install numpy"
            ) from None
    dtype = np.dtype(dtype_str)
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"refusing numpy dtype {dtype_str!r}")
    count = math.prod(shape)
    if count * dtype.itemsize != len(data):
        raise ValueError("ndarray data does not match its dtype and shape")
    if dtype.itemsize == 0 and count:
        # numpy makes S0 and U0 arrays with one-byte items: only V0 is really empty.
        if dtype.kind != "V":
            raise ValueError(f"ndarray of dtype {dtype_str!r} has items of no size")
        if count > MAX_EMPTY_ITEMS:
            raise _Refused(
                f"numpy array of {count} items of dtype {dtype_str!r} (no bytes each), over the "
                f"limit of {MAX_EMPTY_ITEMS}"
            )
    if count == 0 or dtype.itemsize == 0:
        return np.zeros(shape, dtype=dtype)
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def _decode(data: bytes | bytearray | memoryview) -> Any:
    decoder = _Decoder()
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=decoder.ext_hook)
    finally:
        del decoder.ext_hook  # a cycle: left to the garbage collector, it costs more


# --------------------------------------------------------------------------- codecs


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


class PickleCodec(Codec):
    """Opt-in pickle transport for grids whose members share a secret.

    Pickle runs arbitrary code when it loads, so every message is signed with
    HMAC-SHA256 under the shared secret and the signature is checked (in constant
    time) *before* anything is unpickled.  The signature also covers ``context`` (the
    request id of a result), so a signed message is refused when it is presented as
    another request's.  Pickle output is not canonical, so this codec carries payloads
    and results only: request ids are always computed from the msgpack encoding of
    the arguments.
    """

    name = "pickle"
    _MAGIC = b"PGP1"
    _TAG_LEN = hashlib.sha256().digest_size
    MIN_SECRET_BYTES = 32

    def __init__(self, secret: bytes | str) -> None:
        if isinstance(secret, str):
            secret = secret.encode()
        if not isinstance(secret, bytes) or not secret:
            raise ConfigError(
                "PickleCodec secret: must be a non-empty str or bytes shared by every member "
                "of the grid (e.g. from the PYGIRDER_SECRET environment variable)"
            )
        if len(secret) < self.MIN_SECRET_BYTES:
            raise ConfigError(
                f"the pickle secret (PYGIRDER_SECRET) is {len(secret)} bytes long; it needs "
                f"at least {self.MIN_SECRET_BYTES} so it cannot be guessed. Generate one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'` and give "
                "every member of the grid the same one"
            )
        self._secret = secret

    def _tag(self, body: bytes, context: bytes | str) -> bytes:
        bound = context.encode() if isinstance(context, str) else bytes(context)
        mac = hmac.new(self._secret, len(bound).to_bytes(4, "big"), hashlib.sha256)
        mac.update(bound)
        mac.update(body)
        return mac.digest()

    def encode(
        self,
        value: Any,
        *,
        path: str = "value",
        limit: int | None = None,
        context: bytes | str = b"",
    ) -> bytes:
        """Pickle and sign ``value`` bound to ``context``; ``limit`` caps the message."""
        try:
            body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise CodecError(
                f"cannot pickle {path}: {type(exc).__name__}: {exc}; pass picklable data "
                "(module-level functions and classes, no lambdas or open resources)",
                path=path,
            ) from None
        data = self._MAGIC + self._tag(body, context) + body
        return _check_limit(data, path, limit)

    def decode(self, data: bytes, *, path: str = "value", context: bytes | str = b"") -> Any:
        """Verify the signature (of the message and ``context``), then unpickle; a bad
        signature is a CodecError."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise CodecError(
                f"cannot decode {path}: expected bytes, got {_type_name(data)}", path=path
            )
        data = bytes(data)
        head = len(self._MAGIC) + self._TAG_LEN
        if len(data) < head or not data.startswith(self._MAGIC):
            raise CodecError(
                f"cannot decode {path}: not a signed pickle message; HMAC does not verify",
                path=path,
            )
        tag, body = data[len(self._MAGIC) : head], data[head:]
        if not hmac.compare_digest(tag, self._tag(body, context)):
            raise CodecError(
                f"cannot decode {path}: HMAC does not verify; the message was altered, "
                "signed with another secret (do all grid members share the same secret?) "
                "or signed for another request",
                path=path,
            )
        try:
            return pickle.loads(body)
        except Exception as exc:
            raise CodecError(
                f"cannot unpickle {path}: {type(exc).__name__}: {exc}; is the class's "
                "module importable in this process?",
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
