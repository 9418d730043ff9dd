"""The wire format's constants: its version, the extension type codes, the
canonical NaN and the bounds every encoder and decoder shares.
"""

from __future__ import annotations

import struct

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
