"""Tests of the canonical codec: round trips, canonical bytes, errors that name the path."""

from __future__ import annotations

import collections
import dataclasses
import enum
import math
import pickle
import random
import struct
import subprocess
import sys
import threading
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pygirder import codec
from pygirder.codec import (
    DEFAULT_LIMITS,
    MAX_DEPTH,
    Codec,
    MsgpackCodec,
    PickleCodec,
    decode,
    encode,
    register,
)
from pygirder.errors import CodecError, ConfigError, GridFunctionError, PayloadTooLarge

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- fixtures


@register
@dataclasses.dataclass(frozen=True)
class Point:
    x: Any
    y: Any = 0


@register(name="tests.codec:Box")
@dataclasses.dataclass
class Box:
    items: Any
    label: str = "box"
    cached: int = dataclasses.field(default=0, init=False, compare=False)


@dataclasses.dataclass
class NotRegistered:
    x: int


class Opaque:
    def __repr__(self) -> str:
        return "Opaque()"


class Color(enum.IntEnum):
    RED = 1


Pair = collections.namedtuple("Pair", "a b")


def nan_from(hex_bits: str) -> float:
    return struct.unpack(">d", bytes.fromhex(hex_bits))[0]


NANS = [
    float("nan"),
    -float("nan"),
    float("inf") - float("inf"),
    nan_from("7ff8000000000001"),
    nan_from("fff0000000000abc"),
    nan_from("7ff0000000000001"),  # signalling
]


def same(a: Any, b: Any) -> bool:
    """Deep equality that also demands equal types, NaN == NaN and the sign of zero."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if type(a) in (list, tuple):
        return len(a) == len(b) and all(map(same, a, b))
    if type(a) is dict:
        return len(a) == len(b) and matched(list(a.items()), list(b.items()))
    if type(a) in (set, frozenset):
        return len(a) == len(b) and matched(list(a), list(b))
    if dataclasses.is_dataclass(a):
        return all(
            same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a) if f.init
        )
    return a == b


def matched(xs: list[Any], ys: list[Any]) -> bool:
    """Every x has its own ``same`` y (order-free comparison, safe with NaN keys)."""
    left = list(ys)
    for x in xs:
        for i, y in enumerate(left):
            if same(x, y):
                del left[i]
                break
        else:
            return False
    return not left


def reshuffled(value: Any, rnd: random.Random) -> Any:
    """An equal copy of ``value`` whose dicts and sets were built in another order."""
    t = type(value)
    if t is list:
        return [reshuffled(v, rnd) for v in value]
    if t is tuple:
        return tuple(reshuffled(v, rnd) for v in value)
    if t is dict:
        items = [(reshuffled(k, rnd), reshuffled(v, rnd)) for k, v in value.items()]
        rnd.shuffle(items)
        return dict(items)
    if t in (set, frozenset):
        members = [reshuffled(v, rnd) for v in value]
        rnd.shuffle(members)
        return t(members)
    if t is Point:
        return Point(reshuffled(value.x, rnd), reshuffled(value.y, rnd))
    if t is Box:
        return Box(reshuffled(value.items, rnd), value.label)
    return value


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(NANS)
    | st.text()
    | st.binary()
)
hashables = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4).map(tuple)
        | st.frozensets(inner, max_size=4)
        | st.builds(Point, inner, inner)
    ),
    max_leaves=8,
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.lists(inner, max_size=6).map(tuple)
        | st.dictionaries(st.text(max_size=5), inner, max_size=6)
        | st.dictionaries(hashables, inner, max_size=4)
        | st.sets(hashables, max_size=5)
        | st.frozensets(hashables, max_size=5)
        | st.builds(Box, inner, st.text(max_size=3))
        | st.builds(Point, hashables, hashables)
    ),
    max_leaves=30,
)


# --------------------------------------------------------------------------- round trips


@FUZZ
@given(values)
def test_round_trip_keeps_value_and_types(value: Any) -> None:
    data = encode(value)
    back = decode(data)
    assert same(value, back)
    assert encode(back) == data


@FUZZ
@given(values, st.integers(min_value=0, max_value=2**32))
def test_equal_values_give_equal_bytes_whatever_the_build_order(value: Any, seed: int) -> None:
    assert encode(reshuffled(value, random.Random(seed))) == encode(value)


def test_dict_and_set_order_do_not_matter() -> None:
    keys = [f"k{i}" for i in range(50)] + ["é", "z", "", "ab", "a"]
    forward = {k: i for i, k in enumerate(keys)}
    backward = {k: forward[k] for k in reversed(keys)}
    assert list(forward) != list(backward)
    assert encode(forward) == encode(backward)
    mixed_a = {1: "a", "1": "b", (1,): "c", 2.5: "d", None: "e", b"x": "f"}
    mixed_b = dict(reversed(list(mixed_a.items())))
    assert encode(mixed_a) == encode(mixed_b)
    assert encode(set(range(99, -1, -1))) == encode(set(range(100)))
    assert encode(frozenset(keys)) == encode(frozenset(reversed(keys)))


def test_decoded_dicts_come_back_sorted() -> None:
    assert list(decode(encode({"b": 1, "a": 2, "c": 3}))) == ["a", "b", "c"]
    assert list(decode(encode({"b": 1, "a": [{"z": 1, "y": 2}]}))["a"][0]) == ["y", "z"]


_HASH_SEED_SCRIPT = """
from pygirder.codec import encode
words = [f"word{i}" for i in range(40)]
value = {"set": set(words), "fs": frozenset(words), "d": dict.fromkeys(words, 1),
         "mixed": {w if i % 2 else (w,): i for i, w in enumerate(words)}}
print(encode(value).hex())
"""


def test_bytes_do_not_depend_on_the_hash_seed() -> None:
    outputs = set()
    for seed in ("0", "1", "12345"):
        env = {"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"}
        done = subprocess.run(
            [sys.executable, "-c", _HASH_SEED_SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        outputs.add(done.stdout.strip())
    assert len(outputs) == 1


def test_look_alike_values_encode_distinctly() -> None:
    look_alikes = [1, 1.0, True, (1,), [1], {1}, frozenset({1}), b"1", "1", {"1": 1}, {1: 1}]
    encodings = [encode(v) for v in look_alikes]
    assert len(set(encodings)) == len(look_alikes)
    assert encode(0.0) != encode(-0.0)
    assert encode(()) != encode([]) != encode(set()) != encode(frozenset())
    assert encode(Point(1, 2)) != encode((1, 2)) != encode({"x": 1, "y": 2})


def test_nan_has_one_encoding_everywhere() -> None:
    canonical = b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00"
    for nan in NANS:
        assert encode(nan) == canonical
        assert encode([nan, 1.5]) == encode([NANS[0], 1.5])
        assert encode([nan] * 20) == encode([NANS[0]] * 20)
        assert encode((nan,)) == encode((NANS[0],))
        assert encode({"k": nan}) == encode({"k": NANS[0]})
        assert encode({nan: 1}) == encode({NANS[0]: 1})
        assert encode(Point(nan)) == encode(Point(NANS[0]))
    assert math.isnan(decode(encode(NANS[1])))


def test_floats_are_float64() -> None:
    assert encode(0.1) == b"\xcb" + struct.pack(">d", 0.1)
    assert decode(encode(1e308)) == 1e308


@pytest.mark.parametrize(
    ("number", "native"),
    [
        (2**64 - 1, True),
        (2**64, False),
        (-(2**63), True),
        (-(2**63) - 1, False),
        (10**100, False),
        (-(10**100), False),
        (0, True),
    ],
)
def test_int_range(number: int, native: bool) -> None:
    data = encode(number)
    assert decode(data) == number
    assert type(decode(data)) is int
    if native:
        assert data == msgpack.packb(number)
    else:
        assert data[0] in (0xC7, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8)
    # The same int inside a fast-path list and inside a walked list encodes the same way.
    assert encode([number])[1:] == encode([number, (1,)])[1:-4]


def test_big_ints_use_minimal_bytes() -> None:
    assert encode(2**64) == b"\xc7\x09\x01" + (2**64).to_bytes(9, "big", signed=True)
    assert codec.encoding._big_int_bytes(-128) == b"\x80"
    assert codec.encoding._big_int_bytes(128) == b"\x00\x80"
    assert codec.encoding._big_int_bytes(-129) == b"\xff\x7f"


@given(st.integers())
def test_any_int_round_trips(number: int) -> None:
    assert decode(encode(number)) == number
    assert decode(encode([number, number])) == [number, number]


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 8, 15, 16, 17, 255, 256, 65535, 65536])
def test_extension_headers_match_msgpack(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    assert codec.encoding._ext(7, payload) == msgpack.packb(msgpack.ExtType(7, payload))


def test_container_fast_paths_agree_with_the_walk() -> None:
    # A list of plain scalars goes to msgpack whole; one with a tuple in it is walked.
    items = [None, True, 3, -7, 2**70, 1.5, "s", b"b", float("nan")]
    walked = encode([*items, ()])
    fast = encode(items)
    assert walked[0] == fast[0] + 1
    assert walked[1:-3] == fast[1:]
    big = list(range(1000))
    assert encode(big)[3:] == encode([*big, ()])[3:-3]
    as_dict = {f"k{i}": i for i in range(20)}
    with_tuple = {**as_dict, "zz": ()}
    assert encode(with_tuple)[3:].startswith(encode(as_dict)[3:])


def test_module_shortcuts_match_the_codec_class() -> None:
    value = {"a": (1, {2, 3}), "b": [Point(1)]}
    assert encode(value) == MsgpackCodec().encode(value)
    assert MsgpackCodec.name == "msgpack"
    assert PickleCodec.name == "pickle"
    assert issubclass(MsgpackCodec, Codec)
    assert issubclass(PickleCodec, Codec)


def test_encoding_is_thread_safe() -> None:
    value = {"xs": list(range(300)), "t": tuple(range(50)), "s": {f"m{i}" for i in range(50)}}
    expected = encode(value)
    results: list[bytes] = []

    def work() -> None:
        results.extend(encode(value) for _ in range(200))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 800
    assert set(results) == {expected}


def test_codec_does_not_import_numpy() -> None:
    code = "import sys, pygirder.codec; print('numpy' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "False"


# --------------------------------------------------------------------------- dataclasses


def test_registered_dataclasses_round_trip() -> None:
    box = Box([Point(1, (2, 3)), {"k": Point("a")}], label="b")
    box.cached = 99  # not an init field: not sent
    back = decode(encode(box))
    assert type(back) is Box
    assert back == box
    assert back.cached == 0
    assert type(back.items[0]) is Point
    assert decode(encode({Point(1): "frozen ones can be keys"})) == {
        Point(1): "frozen ones can be keys"
    }


def test_registered_names() -> None:
    assert codec.registry._BY_CLASS[Point] == f"{__name__}:Point"
    assert codec.registry._BY_CLASS[Box] == "tests.codec:Box"
    assert b"tests.codec:Box" in encode(Box(1))


def test_mp_main_is_registered_as_main() -> None:
    cls = dataclasses.make_dataclass("MainThing", [("x", int)], frozen=True)
    cls.__module__ = "__mp_main__"
    try:
        register(cls)
        assert codec.registry._BY_CLASS[cls] == "__main__:MainThing"
        assert b"__main__:MainThing" in encode(cls(1))
        assert decode(encode(cls(1))) == cls(1)
    finally:
        codec.registry._BY_NAME.pop("__main__:MainThing", None)
        codec.registry._BY_CLASS.pop(cls, None)


def test_register_same_class_twice_is_fine() -> None:
    assert register(Point) is Point
    assert register(name="tests.codec:Box")(Box) is Box


def test_register_rejects_a_second_class_under_a_taken_name() -> None:
    @dataclasses.dataclass
    class Impostor:
        items: Any

    with pytest.raises(GridFunctionError, match="already taken"):
        register(name="tests.codec:Box")(Impostor)
    with pytest.raises(GridFunctionError, match="already registered as"):
        register(name="tests.codec:OtherBox")(Box)
    assert codec.registry._BY_NAME["tests.codec:Box"] is Box


@pytest.mark.parametrize("thing", [Opaque, 42, collections.namedtuple("NT", "a")])
def test_register_refuses_non_dataclasses(thing: Any) -> None:
    with pytest.raises(GridFunctionError, match="@dataclass"):
        register(thing)


def test_unknown_class_on_decode_says_which_module_to_import() -> None:
    payload = msgpack.packb(["somewhere.models:Ghost", {"x": 1}])
    with pytest.raises(CodecError, match="import the module") as info:
        decode(codec.encoding._ext(5, payload), path="result")
    assert "somewhere.models:Ghost" in str(info.value)
    assert "'somewhere.models'" in str(info.value)
    assert info.value.path == "result"


def test_changed_class_on_decode_is_a_codec_error() -> None:
    payload = msgpack.packb([f"{__name__}:Point", {"x": 1, "zz": 2}])
    with pytest.raises(CodecError, match="same version of the class"):
        decode(codec.encoding._ext(5, payload))


# --------------------------------------------------------------------------- errors


def encode_error(value: Any, path: str = "value") -> CodecError:
    with pytest.raises(CodecError) as info:
        encode(value, path=path)
    assert isinstance(info.value, TypeError)
    assert info.value.path in str(info.value) or len(info.value.path) > 240
    return info.value


def test_lambda_error_names_the_path_and_the_fix() -> None:
    err = encode_error({"x": [1, 2, {"k": lambda: 0}]}, path="args")
    assert err.path == "args['x'][2]['k']"
    assert "lambda" in str(err)
    assert "module-level function" in str(err)


@pytest.mark.parametrize(
    ("value", "path", "words"),
    [
        ((0, Opaque()), "value[1]", ["Opaque", "@pygirder.register", "plain data"]),
        ([[0, [1, Opaque()]]], "value[0][1][1]", ["Opaque"]),
        (Box([1, print]), "value.items[1]", ["builtin_function_or_method", "module-level"]),
        ({"a": Point(1, Opaque())}, "value['a'].y", ["Opaque"]),
        ({Opaque()}, "value{Opaque()}", ["Opaque"]),
        (frozenset({(1, Opaque())}), "value{(1, Opaque())}[1]", ["Opaque"]),
        ({Opaque(): 1}, "value[Opaque()]", ["dict key", "Opaque"]),
        ({"k": 1, Opaque(): 1}, "value[Opaque()]", ["dict key"]),
        ({1: {"z": Opaque()}}, "value[1]['z']", ["Opaque"]),
        ([bytearray(b"x")], "value[0]", ["bytearray", "bytes(...)"]),
        ({"m": memoryview(b"x")}, "value['m']", ["memoryview", "bytes(...)"]),
        ((i for i in range(3)), "value", ["generator", "list(...)"]),
        (range(3), "value", ["range", "list(...)"]),
        ({}.keys(), "value", ["dict_keys", "list(...)"]),
        (collections.OrderedDict(a=1), "value", ["OrderedDict", "dict(...)"]),
        (Pair(1, 2), "value", ["Pair", "tuple(...)"]),
        ([Color.RED], "value[0]", ["Color", ".value"]),
        (NotRegistered(1), "value", ["NotRegistered", "@pygirder.register"]),
        (Opaque, "value", ["class Opaque", "str"]),
        (math, "value", ["module math"]),
        (encode, "value", ["function", "module-level"]),
        ([1, 2.5, "ok", "\ud800"], "value[3]", ["surrogate"]),
        ({"\ud800": 1}, "value['\\ud800']", ["dict key", "surrogate"]),
        ({"\ud800"}, "value{'\\ud800'}", ["surrogate"]),
        (1j, "value", ["complex", "plain data"]),
        (Ellipsis, "value", ["ellipsis"]),
    ],
)
def test_unencodable_values_name_path_type_and_fix(value: Any, path: str, words: list[str]) -> None:
    err = encode_error(value)
    assert err.path == path
    for word in words:
        assert word in str(err)


def test_failed_encoding_leaves_the_codec_usable() -> None:
    encode_error(["\ud800"] * 20)
    encode_error({"a": "\ud800"})
    assert encode([1]) == b"\x91\x01"
    assert encode({"a": 1}) == b"\x81\xa1a\x01"


def nested(depth: int, wrap: Any) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = wrap(value)
    return value


@pytest.mark.parametrize(
    "wrap",
    [
        lambda v: [v],
        lambda v: (v,),
        lambda v: {"k": v},
        lambda v: {1: v},
        lambda v: frozenset([v]),
        lambda v: Box(v),
    ],
    ids=["list", "tuple", "dict", "int-key-dict", "frozenset", "dataclass"],
)
def test_depth_limit(wrap: Any) -> None:
    deepest = nested(MAX_DEPTH, wrap)
    message = encode(deepest)
    back = decode(message)
    assert type(back) is type(deepest)
    assert encode(back) == message
    err = encode_error(nested(MAX_DEPTH + 1, wrap))
    assert f"more than {MAX_DEPTH} levels" in str(err)


def test_reference_cycles_are_codec_errors() -> None:
    loop: list[Any] = []
    loop.append(loop)
    assert "reference cycle" in str(encode_error(loop))
    table: dict[str, Any] = {}
    table["self"] = table
    assert "reference cycle" in str(encode_error(table))


def test_deep_call_stack_gives_codec_error_not_recursion_error() -> None:
    def recurse(n: int) -> bytes:
        return encode(nested(MAX_DEPTH, lambda v: (v,))) if n == 0 else recurse(n - 1)

    limit = sys.getrecursionlimit()
    try:
        sys.setrecursionlimit(700)
        with pytest.raises(CodecError):
            recurse(400)
    finally:
        sys.setrecursionlimit(limit)


def test_payload_too_large() -> None:
    value = b"x" * 1000
    size = len(encode(value))
    assert encode(value, limit=size) == encode(value)
    with pytest.raises(PayloadTooLarge) as info:
        encode(value, path="args.blob", limit=size - 1)
    err = info.value
    assert isinstance(err, CodecError)
    assert (err.path, err.size, err.limit) == ("args.blob", size, size - 1)
    text = str(err)
    for word in ("args.blob", str(size), str(size - 1), "max_arg_bytes", "max_result_bytes"):
        assert word in text
    assert "reference" in text


def test_default_limits() -> None:
    assert DEFAULT_LIMITS["max_arg_bytes"] == 64 * 1024 * 1024
    assert DEFAULT_LIMITS["max_result_bytes"] == 512 * 1024 * 1024 - 1


# --------------------------------------------------------------------------- decoding garbage


def decode_or_codec_error(data: bytes) -> None:
    try:
        decode(data)
    except CodecError:
        pass


@FUZZ
@given(st.binary(max_size=200))
def test_decoding_random_bytes_only_raises_codec_error(data: bytes) -> None:
    decode_or_codec_error(data)


@FUZZ
@given(
    st.lists(
        st.sampled_from(
            [b"\xc7", b"\xc8", b"\xc9", b"\xd4", b"\xd5", b"\xd6", b"\xd7", b"\xd8"]
            + [bytes([code & 0xFF]) for code in range(-2, 8)]
            + [b"\x91", b"\x92", b"\x81", b"\xdd", b"\xdf", b"\xc4", b"\x00", b"\xff", b"\xa1a"]
        ),
        max_size=40,
    )
)
def test_decoding_extension_shaped_garbage_only_raises_codec_error(parts: list[bytes]) -> None:
    decode_or_codec_error(b"".join(parts))


@FUZZ
@given(values, st.data())
def test_truncated_and_corrupted_messages(value: Any, data: st.DataObject) -> None:
    message = encode(value)
    cut = data.draw(st.integers(min_value=0, max_value=len(message) - 1))
    with pytest.raises(CodecError):
        decode(message[:cut])
    with pytest.raises(CodecError):
        decode(message + b"\x00")
    index = data.draw(st.integers(min_value=0, max_value=len(message) - 1))
    flipped = bytearray(message)
    flipped[index] ^= data.draw(st.integers(min_value=1, max_value=255))
    decode_or_codec_error(bytes(flipped))


def nested_extensions(levels: int, code: int = 2) -> bytes:
    data = msgpack.packb([1])
    for _ in range(levels):
        data = b"\x91" + codec.encoding._ext(code, data)
    return data


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 5000])
def test_hostile_nesting_is_refused_without_crashing(levels: int) -> None:
    with pytest.raises(CodecError):
        decode(nested_extensions(levels))
    with pytest.raises(CodecError):
        decode(b"\x91" * levels * 3 + b"\x01")


def test_legal_nesting_decodes_in_a_thread() -> None:
    # Threads (where workers run sync functions) have their own, fixed-size stacks.
    results: list[Any] = []
    message = encode(nested(MAX_DEPTH, lambda v: (v,)))
    thread = threading.Thread(target=lambda: results.append(decode(message)))
    thread.start()
    thread.join()
    assert results and encode(results[0]) == message


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never used in msgpack
        codec.encoding._ext(99, b"\x01"),
        codec.encoding._ext(1, b""),
        codec.encoding._ext(2, b"\x01"),  # a tuple of a non-array
        codec.encoding._ext(3, b"\x91\x90"),  # a set holding a list
        codec.encoding._ext(5, msgpack.packb([1, 2])),
        codec.encoding._ext(5, msgpack.packb(["x"])),
        codec.encoding._ext(6, msgpack.packb(["<f8", [2], b"\x00" * 8])),
        b"\x81\x91\x01\x02",  # a map keyed by a list
        b"\xa2\xff\xfe",  # invalid UTF-8
        b"\xdd\xff\xff\xff\xff",  # an array claiming 4 billion items
    ],
)
def test_malformed_messages_are_codec_errors(data: bytes) -> None:
    with pytest.raises(CodecError, match="cannot decode result"):
        decode(data, path="result")


def test_decode_wants_bytes() -> None:
    with pytest.raises(CodecError, match="expected bytes"):
        decode("not bytes")  # type: ignore[arg-type]
    assert decode(bytearray(encode([1]))) == [1]
    assert decode(memoryview(encode((1,)))) == (1,)


# --------------------------------------------------------------------------- numpy


def test_numpy_arrays_and_scalars() -> None:
    np = pytest.importorskip("numpy")
    array = np.arange(12, dtype="<i4").reshape(3, 4)
    back = decode(encode({"a": array}))["a"]
    assert back.dtype == array.dtype and back.shape == (3, 4)
    assert (back == array).all()
    back[0, 0] = 5  # decoded arrays are writable
    assert encode(np.float64(1.5)) == encode(1.5)
    assert encode(np.int64(7)) == encode(7)
    assert encode(np.bool_(True)) == encode(True)
    assert encode(array.astype(">i4")) == encode(array)
    assert encode(np.asfortranarray(array)) == encode(array)
    nans = np.array([np.nan, -np.nan, 1.0])
    assert encode(nans) == encode(np.array([np.nan, np.nan, 1.0]))
    assert encode(np.zeros((0, 3))) != encode(np.zeros((3, 0)))
    assert decode(encode(np.zeros((0, 3)))).shape == (0, 3)
    assert decode(encode(np.array(3.5))).shape == ()


def test_numpy_object_arrays_are_refused() -> None:
    np = pytest.importorskip("numpy")
    err = encode_error([np.array([object()], dtype=object)])
    assert err.path == "value[0]"
    assert "object" in str(err)
    with pytest.raises(CodecError):
        decode(codec.encoding._ext(6, msgpack.packb(["|O", [1], b"\x00" * 8])))


# --------------------------------------------------------------------------- pickle


@dataclasses.dataclass
class Unregistered:
    value: complex


def test_pickle_codec_round_trip() -> None:
    pickler = PickleCodec("s3cret" * 6)
    value = {"x": Unregistered(1j), "y": (1, {2})}
    assert pickler.decode(pickler.encode(value)) == value
    assert PickleCodec(b"s3cret" * 6).decode(pickler.encode(value)) == value


def test_pickle_codec_rejects_tampering_before_unpickling() -> None:
    pickler = PickleCodec(b"key" * 11)
    message = bytearray(pickler.encode([1, 2, 3]))
    message[-2] ^= 1
    with pytest.raises(CodecError, match="HMAC does not verify"):
        pickler.decode(bytes(message))
    # A forged message is never unpickled: loading this one would raise on purpose.
    body = pickle.dumps(Boom())
    forged = b"PGP1" + b"\x00" * 32 + body
    with pytest.raises(CodecError, match="HMAC does not verify"):
        pickler.decode(forged)
    with pytest.raises(CodecError, match="HMAC does not verify"):
        pickler.decode(b"PGP1")


def test_pickle_codec_rejects_another_secret() -> None:
    message = PickleCodec("one" * 11).encode("hello")
    with pytest.raises(CodecError, match="HMAC does not verify"):
        PickleCodec("two" * 11).decode(message)


@pytest.mark.parametrize("secret", ["", b"", None, "31-bytes-is-too-short-to-be-ok!"])
def test_pickle_codec_needs_a_secret(secret: Any) -> None:
    with pytest.raises(ConfigError, match="secret"):
        PickleCodec(secret)


def test_pickle_codec_signature_covers_the_context() -> None:
    pickler = PickleCodec("k" * 32)
    message = pickler.encode([1, 2], context="request-a")
    assert pickler.decode(message, context="request-a") == [1, 2]
    with pytest.raises(CodecError, match="HMAC does not verify"):
        pickler.decode(message, context="request-b")
    with pytest.raises(CodecError, match="HMAC does not verify"):
        pickler.decode(message)


def test_pickle_codec_errors_and_limits() -> None:
    pickler = PickleCodec("k" * 32)
    with pytest.raises(CodecError, match=r"cannot pickle args\.f") as info:
        pickler.encode(lambda: 1, path="args.f")
    assert info.value.path == "args.f"
    with pytest.raises(PayloadTooLarge):
        pickler.encode(b"x" * 100, limit=50)


class Boom:
    def __reduce__(self) -> tuple[Any, ...]:
        return (_explode, ())


def _explode() -> None:
    raise AssertionError("a forged pickle was loaded")


def _general(value):
    """The encoding of the general path (one value walked by the packer)."""
    from pygirder.codec import encoding as c

    return c._enc(value, c._packers.packer, 0)


@pytest.mark.parametrize("size", [65535, 65536, 65537, 1 << 20])
def test_large_bytes_encode_as_the_general_path_does(size):
    value = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    assert codec.encode(value) == _general(value)
    assert codec.encode(value, prefix=b"O") == b"O" + _general(value)
    assert codec.decode(memoryview(codec.encode(value, prefix=b"O"))[1:]) == value


def test_large_numpy_arrays_encode_as_the_general_path_does():
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(7)
    values = [
        rng.random((300, 100)),  # float64, 240 KB
        rng.integers(0, 1 << 30, size=70_000, dtype=np.int32),
        rng.random((400, 400))[::2, ::3],  # not contiguous
        rng.random(20_000).astype(">f8"),  # big-endian: the general path swaps it
        np.array([np.nan] * 10_000),  # NaNs: made canonical on the general path
        (rng.random(70_000) > 0.5),  # bool
        np.array(["abcd"] * 5_000),  # <U4
        np.arange(0, 10_000, dtype="datetime64[s]"),  # no buffer format
        np.zeros((0, 100_000)),  # empty: the general path
    ]
    for value in values:
        encoded = codec.encode(value, prefix=b"O")
        assert encoded == b"O" + _general(value), value.dtype
        back = codec.decode(memoryview(encoded)[1:])
        assert back.dtype.newbyteorder("=") == value.dtype.newbyteorder("=")
        assert np.array_equal(back, value, equal_nan=value.dtype.kind in "fc")


def test_the_limit_counts_the_encoding_of_a_large_value_not_the_prefix():
    value = b"v" * 100_000
    size = len(_general(value))
    assert len(codec.encode(value, limit=size, prefix=b"O")) == size + 1
    with pytest.raises(PayloadTooLarge) as err:
        codec.encode(value, limit=size - 1, path="result of f")
    assert err.value.size == size and "result of f" in str(err.value)
