"""Bytes back to values, bounded for any input: a message decodes, or fails with a
CodecError, in time and memory about linear in its size, at any nesting.
"""

from __future__ import annotations

import math
import re
import sys
from typing import Any

import msgpack

from .encoding import _short_repr
from .registry import _BY_NAME, _INIT_FIELDS
from .wire import (
    _EXT_BIGINT,
    _EXT_DATACLASS,
    _EXT_NDARRAY,
    _EXT_SET,
    _EXT_TUPLE,
    _INT64_END,
    MAX_DEPTH,
)

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
    if type(dtype_str) is not str or type(shape) is not list or type(data) not in _BUFFERS:
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


_BUFFERS = (bytes, memoryview)  # an array's data: unpacked, or a view of the message

# A top-level array at least this large is decoded from a view of the message.
_LARGE_ARRAY = 64 * 1024
_BIN_LENGTH = {0xC4: 1, 0xC5: 2, 0xC6: 4}


def _large_array(view: memoryview) -> Any:
    """A message that is one large numpy array, decoded with one copy (the array's own
    buffer) straight from ``view``; None for any other message, which then takes the
    general path (errors included).  The general path copies the data three times:
    the extension's payload, the bin object inside it, and the writable array."""
    end = len(view)
    if view[0] != 0xC9 or view[5] != _EXT_NDARRAY or int.from_bytes(view[1:5], "big") != end - 6:
        return None
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(view[6 : 6 + 4096])  # dtype and shape are small; the rest is data
    try:
        if unpacker.read_array_header() != 3:
            return None
        dtype_str, shape = unpacker.unpack(), unpacker.unpack()
    except Exception:
        return None
    at = 6 + unpacker.tell()
    width = _BIN_LENGTH.get(view[at])
    start = at + 1 + (width or 0)
    if width is None or int.from_bytes(view[at + 1 : start], "big") != end - start:
        return None
    return _decode_ndarray([dtype_str, shape, view[start:]])


def _decode(data: bytes | bytearray | memoryview) -> Any:
    if len(data) >= _LARGE_ARRAY and data[0] == 0xC9:
        view = memoryview(data)
        if view.format == "B" and view.ndim == 1:
            value = _large_array(view)
            if value is not None:
                return value
    decoder = _Decoder()
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=decoder.ext_hook)
    finally:
        del decoder.ext_hook  # a cycle: left to the garbage collector, it costs more
