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

# The package: ``wire`` (format constants), ``registry`` (registered dataclasses),
# ``encoding`` and ``decoding`` (the canonical msgpack form), ``codecs`` (the codec
# interface and the default codec), ``signed`` (signed pickle).

from __future__ import annotations

from .codecs import Codec, MsgpackCodec, decode, encode
from .decoding import MAX_EMPTY_ITEMS, MAX_HASH_COLLISIONS, MAX_NDIM
from .registry import register
from .signed import PickleCodec
from .wire import DEFAULT_LIMITS, MAX_DEPTH, VERSION

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
