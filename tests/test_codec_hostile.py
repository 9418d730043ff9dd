"""Hostile messages: every input decodes, or fails with a CodecError, in bounded time and memory.

Each crafted input below once cost far more than its size (seconds of CPU, gigabytes,
or a crash); the same inputs live as files in ``tests/fuzz/corpus/`` (written by
``python tests/test_codec_hostile.py --write-corpus``), where a replay test and the
fuzz harness ``tests/fuzz/fuzz_decode.py`` pick them up.  Time is asserted only with
a generous budget (noisy machines); ``bench/codec_decode.py`` prints the real figures.
"""

from __future__ import annotations

import dataclasses
import gc
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pygirder import codec
from pygirder.codec import (
    MAX_DEPTH,
    MAX_EMPTY_ITEMS,
    MAX_HASH_COLLISIONS,
    MAX_NDIM,
    decode,
    encode,
    register,
)
from pygirder.errors import CodecError

CORPUS = Path(__file__).parent / "fuzz" / "corpus"

#: What a message of at most 1 MB may cost to decode.  The goal for time is 100 ms;
#: the budget asserted is 20 times that, so that only a blow-up (what every input
#: here once caused: seconds to minutes) fails, never a busy machine.
MAX_PEAK_BYTES = 64 * 1024 * 1024
TIME_BUDGET = 2.0

_PACK = msgpack.Packer(use_bin_type=True)


# --------------------------------------------------------------------------- crafting


def ext(code: int, payload: bytes) -> bytes:
    return codec.encoding._ext(code, payload)


def array_of(items: list[bytes]) -> bytes:
    return _PACK.pack_array_header(len(items)) + b"".join(items)


def map_of(pairs: list[tuple[bytes, bytes]]) -> bytes:
    return _PACK.pack_map_header(len(pairs)) + b"".join(k + v for k, v in pairs)


def bigint(value: int) -> bytes:
    return ext(codec.wire._EXT_BIGINT, codec.encoding._big_int_bytes(value))


def colliding_bigints(count: int) -> list[int]:
    """Distinct ints above 64 bits with one hash: ints hash modulo 2**61 - 1."""
    return [2**64 + k * (2**61 - 1) for k in range(count)]


_M64 = 2**64
_XXPRIME_1 = 11400714785074694791
_XXPRIME_2 = 14029467366897019727
_XXPRIME_5 = 2870177450012600261


def _rotl31(x: int) -> int:
    return ((x << 31) | (x >> 33)) % _M64


def _rotr31(x: int) -> int:
    return ((x >> 31) | (x << 33)) % _M64


def colliding_pairs(count: int, target: int = 12345) -> list[tuple[int, int]]:
    """Distinct 2-tuples of 64-bit ints with one hash.

    CPython's tuple hash (xxHash's round, over the items' hashes) is invertible
    and small ints hash to themselves: pick the first item, solve for the second.
    """
    inv1, inv2 = pow(_XXPRIME_1, -1, _M64), pow(_XXPRIME_2, -1, _M64)
    final = (target - (2 ^ _XXPRIME_5 ^ 3527539)) % _M64
    before_second = _rotr31(final * inv1 % _M64)
    pairs = []
    first = 0
    while len(pairs) < count:
        first += 1
        acc = _rotl31((_XXPRIME_5 + first * _XXPRIME_2) % _M64) * _XXPRIME_1 % _M64
        lane = (before_second - acc) * inv2 % _M64
        second = lane - _M64 if lane >= 2**63 else lane
        if abs(second) < 2**61 - 1 and second != -1:
            pairs.append((first, second))
    return pairs


def tuple_bytes(pair: tuple[int, int]) -> bytes:
    return ext(codec.wire._EXT_TUPLE, _PACK.pack(list(pair)))


def nested_tuples(levels: int) -> bytes:
    data = _PACK.pack(0)
    for _ in range(levels):
        data = ext(codec.wire._EXT_TUPLE, array_of([data]))
    return data


def ndarray(dtype: str, shape: list[int], data: bytes = b"") -> bytes:
    return ext(codec.wire._EXT_NDARRAY, _PACK.pack([dtype, shape, data]))


@register(name="tests.hostile:Small")
@dataclasses.dataclass(frozen=True)
class Small:
    a: int = 0


def _hostile() -> dict[str, Callable[[], bytes]]:
    return {
        # The first four found: seconds of CPU, gigabytes, a crash.
        "set-of-20000-colliding-bigints": lambda: ext(
            codec.wire._EXT_SET, array_of([bigint(v) for v in colliding_bigints(20_000)])
        ),
        "ndarray-40000-dims": lambda: ndarray("<f8", [2**63 - 1] * 40_000),
        "ndarray-S0-huge-shape": lambda: ndarray("|S0", [2**31]),
        "tuples-nested-5000-deep": lambda: nested_tuples(5000),
        # Hash flooding of dict keys and set members beyond big ints.
        "dict-of-10000-colliding-tuple-keys": lambda: map_of(
            [(tuple_bytes(p), b"\x00") for p in colliding_pairs(10_000)]
        ),
        "frozenset-of-10000-colliding-tuples": lambda: ext(
            codec.wire._EXT_FROZENSET, array_of([tuple_bytes(p) for p in colliding_pairs(10_000)])
        ),
        "dict-of-15000-colliding-bigint-keys": lambda: map_of(
            [(bigint(v), b"\xc0") for v in colliding_bigints(15_000)]
        ),
        "deep-dict-of-colliding-tuple-keys": lambda: _wrap_tuples(
            map_of([(tuple_bytes(p), b"\x00") for p in colliding_pairs(10_000)]), 5
        ),
        "set-of-256-colliding-tuples-and-40000-copies": lambda: ext(
            codec.wire._EXT_SET,
            array_of(
                [tuple_bytes(p) for p in colliding_pairs(MAX_HASH_COLLISIONS)]
                + [tuple_bytes(colliding_pairs(MAX_HASH_COLLISIONS)[-1])] * 40_000
            ),
        ),
        # Many small extensions: each costs a call of the extension hook.
        "list-of-163840-distinct-3-tuples": lambda: array_of(
            [
                ext(codec.wire._EXT_TUPLE, bytes((0x93, a, b, c)))
                for a in range(10)
                for b in range(128)
                for c in range(128)
            ]
        ),
        # Declared lengths, plain nesting, unhashable members.
        "array-header-of-4-billion": lambda: b"\xdd\xff\xff\xff\xff" + b"\x00" * 100,
        "map-header-of-500000": lambda: b"\xdf\x00\x07\xa1\x20" + b"\x00" * 999_000,
        "lists-nested-100000-deep": lambda: b"\x91" * 100_000 + b"\x00",
        "extension-header-of-4-gigabytes": lambda: b"\xc9\xff\xff\xff\xff\x02\x90",
        "set-of-lists": lambda: ext(
            codec.wire._EXT_SET, array_of([_PACK.pack([i]) for i in range(100)])
        ),
        # Big payloads nested deep: each level's payload is a copy of the rest.
        "1mb-bytes-in-500-nested-tuples": lambda: _wrap_tuples(
            _PACK.pack(b"\x00" * 1_000_000), 499
        ),
        "1mb-bigint": lambda: bigint(2 ** (8 * 1_000_000 - 9)),
        # numpy: empty items, odd dims, dtype strings.
        "ndarray-V0-2**40-items": lambda: ndarray("|V0", [2**40]),
        "ndarray-U0-huge-shape": lambda: ndarray("<U0", [2**30, 4]),
        "ndarray-negative-dim": lambda: ndarray("<f8", [-1, -8], b"\x00" * 64),
        "ndarray-dim-over-int64": lambda: ndarray("<f8", [0, 2**64 - 1]),
        "ndarray-zero-and-huge-dims": lambda: ndarray("<f8", [0] + [2**62] * 63),
        "ndarray-huge-itemsize": lambda: ndarray("<U999999999", [0, 2**40]),
        "ndarray-subarray-dtype": lambda: ndarray("(1000000,1000000)f8", [1], b""),
        "ndarray-long-dtype-string": lambda: ndarray("f8," * 100_000, [1], b""),
        "ndarray-data-shorter-than-shape": lambda: ndarray("<f8", [2**20, 2**20], b"\x00" * 8),
        # Dataclasses: unknown names and field maps.
        "dataclass-with-100000-fields": lambda: ext(
            codec.wire._EXT_DATACLASS,
            _PACK.pack(["tests.hostile:Small", {f"f{i}": 0 for i in range(100_000)}]),
        ),
        "dataclass-with-a-huge-name": lambda: ext(
            codec.wire._EXT_DATACLASS, _PACK.pack(["x" * 100_000, {}])
        ),
    }


def _wrap_tuples(data: bytes, levels: int) -> bytes:
    for _ in range(levels):
        data = ext(codec.wire._EXT_TUPLE, array_of([data]))
    return data


HOSTILE = _hostile()


def _outcome(data: bytes) -> str:
    try:
        decode(data)
    except CodecError as exc:
        return f"CodecError: {exc}"
    return "value"


def measure(data: bytes) -> tuple[str, float, int]:
    """Decode ``data`` twice: (outcome, CPU seconds of the first decode, peak bytes
    traced in the second).  Anything but a value or a CodecError propagates.

    CPU time, not wall time: a shared machine's load does not count against the
    decoder.  Tracing slows a decode several times, so the timed one is untraced.
    """
    started = time.process_time()
    outcome = _outcome(data)
    elapsed = time.process_time() - started
    tracemalloc.start()
    try:
        _outcome(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return outcome, elapsed, peak


def assert_bounded(data: bytes) -> str:
    outcome, elapsed, peak = measure(data)
    assert peak <= MAX_PEAK_BYTES, f"peak {peak / 2**20:.1f} MiB for {len(data)} bytes"
    assert elapsed <= TIME_BUDGET, f"{elapsed:.2f} s of CPU for {len(data)} bytes"
    return outcome


# --------------------------------------------------------------------------- the crafted inputs


def test_crafted_inputs_are_small() -> None:
    for name, build in HOSTILE.items():
        assert len(build()) <= 1 << 20, name


def test_colliding_values_really_collide() -> None:
    pairs = colliding_pairs(50)
    assert len(set(pairs)) == 50 and len({hash(p) for p in pairs}) == 1
    assert all(-(2**63) <= n < 2**63 for p in pairs for n in p)
    ints = colliding_bigints(50)
    assert len({hash(n) for n in ints}) == 1 and min(ints) >= 2**64


def test_set_of_colliding_big_ints_is_refused() -> None:
    with pytest.raises(CodecError, match="share their hash"):
        decode(HOSTILE["set-of-20000-colliding-bigints"]())


@pytest.mark.parametrize(
    "name",
    [
        "dict-of-10000-colliding-tuple-keys",
        "frozenset-of-10000-colliding-tuples",
        "dict-of-15000-colliding-bigint-keys",
        "deep-dict-of-colliding-tuple-keys",
        "set-of-256-colliding-tuples-and-40000-copies",
    ],
)
def test_colliding_keys_and_members_are_refused(name: str) -> None:
    assert "share their hash" in assert_bounded(HOSTILE[name]())


def test_a_few_colliding_keys_still_decode() -> None:
    # Below the limit, collisions are merely slow-ish, and canonical values with
    # them (they exist, e.g. -1 and -2 hash alike) must still decode.
    pairs = colliding_pairs(MAX_HASH_COLLISIONS + 1)
    value = {p: i for i, p in enumerate(pairs)}
    assert decode(encode(value)) == value
    assert decode(encode(frozenset(pairs))) == frozenset(pairs)
    assert decode(encode(set(colliding_bigints(100)))) == set(colliding_bigints(100))
    many = [(i, i) for i in range(5000)]  # many hashable extensions: maps get checked
    assert decode(encode([many, {p: 1 for p in pairs}])) == [many, {p: 1 for p in pairs}]


def test_many_dimensions_are_refused_before_numpy_sees_them() -> None:
    pytest.importorskip("numpy")
    with pytest.raises(CodecError, match=f"numpy has at most {MAX_NDIM}"):
        decode(HOSTILE["ndarray-40000-dims"]())


@pytest.mark.parametrize("name", ["ndarray-S0-huge-shape", "ndarray-U0-huge-shape"])
def test_arrays_of_no_data_cannot_allocate(name: str) -> None:
    pytest.importorskip("numpy")
    with pytest.raises(CodecError, match="items of no size"):
        decode(HOSTILE[name]())


def test_empty_item_arrays_are_capped() -> None:
    np = pytest.importorskip("numpy")
    with pytest.raises(CodecError, match="over the limit"):
        decode(HOSTILE["ndarray-V0-2**40-items"]())
    small = np.zeros(MAX_EMPTY_ITEMS, "V0")
    assert decode(encode(small)).shape == (MAX_EMPTY_ITEMS,)


@pytest.mark.parametrize(
    "name, words",
    [
        ("ndarray-negative-dim", "malformed ndarray shape"),
        ("ndarray-dim-over-int64", "malformed ndarray shape"),
        ("ndarray-huge-itemsize", "CodecError"),
        ("ndarray-subarray-dtype", "malformed ndarray dtype"),
        ("ndarray-long-dtype-string", "malformed ndarray dtype"),
        ("ndarray-data-shorter-than-shape", "does not match"),
        ("ndarray-zero-and-huge-dims", "CodecError"),
    ],
)
def test_odd_arrays_are_codec_errors(name: str, words: str) -> None:
    pytest.importorskip("numpy")
    assert words in assert_bounded(HOSTILE[name]())


def test_every_dtype_the_encoder_writes_decodes() -> None:
    np = pytest.importorskip("numpy")
    for code in "?bhilqBHILQefdgFDG":
        array = np.zeros(3, code)
        assert decode(encode(array)).dtype == array.dtype
    for dtype in ["S5", "U7", "V16", "M8[ns]", "m8[25s]", "M8", "f2", "c16", "V0"]:
        array = np.zeros((2, 0, 3), dtype)
        assert decode(encode(array)).dtype == array.dtype
        array = np.zeros((2, 3), dtype)
        assert decode(encode(array)).dtype == array.dtype


def test_unhashable_set_members_say_so() -> None:
    with pytest.raises(CodecError, match="a set member is unhashable"):
        decode(HOSTILE["set-of-lists"]())
    with pytest.raises(CodecError, match="a set member is unhashable"):
        decode(ext(codec.wire._EXT_SET, array_of([_PACK.pack([1])])))


def test_dataclass_with_unknown_fields_gives_a_short_error() -> None:
    with pytest.raises(CodecError, match="'f0', 'f1', 'f2', 'f3', 'f4' and 99995 more") as info:
        decode(HOSTILE["dataclass-with-100000-fields"]())
    assert len(str(info.value)) < 500
    with pytest.raises(CodecError, match="not registered") as info:
        decode(HOSTILE["dataclass-with-a-huge-name"]())
    assert len(str(info.value)) < 1000


def test_deep_plain_nesting_says_so() -> None:
    with pytest.raises(CodecError, match="nested more than msgpack's 1024 levels"):
        decode(HOSTILE["lists-nested-100000-deep"]())
    assert decode(b"\x91" * 1000 + b"\x00") is not None  # msgpack's own limit, not ours


def test_declared_lengths_are_bounded_by_the_message() -> None:
    for name in [
        "array-header-of-4-billion",
        "map-header-of-500000",
        "lists-nested-100000-deep",
        "extension-header-of-4-gigabytes",
    ]:
        assert assert_bounded(HOSTILE[name]()).startswith("CodecError"), name


def test_big_payloads_nested_deep_and_big_ints_decode() -> None:
    assert assert_bounded(HOSTILE["list-of-163840-distinct-3-tuples"]()) == "value"
    assert assert_bounded(HOSTILE["1mb-bytes-in-500-nested-tuples"]()) == "value"
    assert assert_bounded(HOSTILE["1mb-bigint"]()) == "value"
    assert decode(HOSTILE["1mb-bigint"]()) == 2 ** (8 * 1_000_000 - 9)


def test_decoding_leaves_no_garbage_cycles() -> None:
    # The decoder's state would otherwise live until the next collection, with a
    # reference to every value it made.
    message = encode([(1, 2), {(3,): frozenset({4})}, ((((5,),),),), 2**70])
    gc.collect()
    gc.disable()
    try:
        decode(message)
        assert gc.collect() == 0
    finally:
        gc.enable()


# --------------------------------------------------------------------------- the C stack

_SMALL_STACK = textwrap.dedent(
    """
    import sys, threading
    from pygirder.codec import decode, encode, MAX_DEPTH
    from pygirder.errors import CodecError
    sys.path.insert(0, {tests!r})
    from test_codec_hostile import HOSTILE, nested_tuples, _wrap_tuples, _PACK

    def nest(levels):
        value = 0
        for _ in range(levels):
            value = (value,)
        return value

    def run():
        assert decode(nested_tuples(MAX_DEPTH)) == nest(MAX_DEPTH)
        value = [nest(MAX_DEPTH - 1), {{nest(400): nest(300)}}]
        assert decode(encode(value)) == value
        for name in ["tuples-nested-5000-deep", "lists-nested-100000-deep"]:
            try:
                decode(HOSTILE[name]())
            except CodecError as exc:
                print(name, "CodecError:", exc)
            else:
                raise AssertionError(name + " decoded")
        try:
            decode(nested_tuples(MAX_DEPTH + 1))
        except CodecError as exc:
            print("too deep:", exc)
        else:
            raise AssertionError("decoded")
        print("ok")

    threading.stack_size(256 * 1024)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    """
)


def test_deep_extensions_decode_in_a_thread_with_a_small_stack() -> None:
    # A 256 KiB thread stack (macOS gives 512 KiB, musl 128 KiB) once overflowed at
    # about 100 nested extensions and crashed the whole process.
    script = _SMALL_STACK.format(tests=str(Path(__file__).parent))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[-1] == "ok", done.stdout + done.stderr
    assert f"extensions nested more than {MAX_DEPTH} levels deep" in done.stdout
    assert "tuples-nested-5000-deep CodecError" in done.stdout


def test_deep_values_round_trip() -> None:
    def nest(levels: int, leaf: Any) -> Any:
        value = leaf
        for i in range(levels):
            value = (value, frozenset({i}), [i, {"k": (i,)}]) if i % 3 else [value]
        return value

    for value in [nest(300, 1), nest(120, {(1, 2): {3, 4}}), nest(30, Small(a=2))]:
        message = encode(value)
        assert decode(message) == value
        assert encode(decode(message)) == message
    big = {(i, (i, (i, (i, (i,))))): [(i,)] for i in range(3000)}
    assert decode(encode(big)) == big


# --------------------------------------------------------------------------- corpus and fuzzing


def corpus_files() -> list[Path]:
    return sorted(p for p in CORPUS.iterdir() if p.is_file())


def test_corpus_holds_every_crafted_input() -> None:
    names = {p.name for p in corpus_files()}
    missing = [name for name in HOSTILE if name not in names]
    assert not missing, "run: python tests/test_codec_hostile.py --write-corpus"
    for name, build in HOSTILE.items():
        assert (CORPUS / name).read_bytes() == build(), name


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_corpus_replays_bounded(path: Path) -> None:
    assert_bounded(path.read_bytes())


def _valid_messages() -> list[bytes]:
    values: list[Any] = [
        [1, 2.5, "x", b"y", None, True],
        {"a": (1, 2), "b": {3, 4}, (5, 6): frozenset({7})},
        {(1, (2, (3, (4, (5,))))): [{9}]},
        Small(a=3),
        2**100,
        [-(2**70), (2**65, "z")],
    ]
    np = sys.modules.get("numpy")
    if np is not None:
        values.append(np.arange(6, dtype="<i4").reshape(2, 3))
    return [encode(v) for v in values] + [p.read_bytes()[:4096] for p in corpus_files()]


_VALID = _valid_messages()

_FUZZ = settings(
    max_examples=4000,
    deadline=None,  # the time bound is asserted per example, with a budget for noise
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid (or corpus) message with a few bytes changed, cut, repeated or spliced."""
    data = bytearray(draw(st.sampled_from(_VALID)))
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["flip", "insert", "cut", "repeat", "splice", "header"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "cut":
            del data[at : at + draw(st.integers(1, 16))]
        elif action == "repeat":
            end = min(len(data), at + draw(st.integers(1, 64)))
            data[at:at] = data[at:end] * draw(st.integers(1, 200))
        elif action == "splice":
            other = draw(st.sampled_from(_VALID))
            data[at:at] = other[: draw(st.integers(0, len(other)))]
        else:
            header = draw(
                st.sampled_from([b"\xdd", b"\xdf", b"\xc9", b"\xc6", b"\xdb", b"\xc8", b"\xde"])
            )
            data[at:at] = header + draw(st.binary(min_size=2, max_size=4))
    return bytes(data[:1_000_000])


@_FUZZ
@given(st.one_of(st.binary(max_size=2000), mutated()))
def test_fuzz_decode_is_bounded(data: bytes) -> None:
    assert_bounded(data)


@pytest.mark.slow
def test_atheris_harness_runs_clean(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    harness = Path(__file__).parent / "fuzz" / "fuzz_decode.py"
    found = tmp_path / "found"
    found.mkdir()
    limits = ["-runs=3000", "-timeout=5", "-rss_limit_mb=2048", "-max_len=65536"]
    done = subprocess.run(
        [sys.executable, str(harness), str(found), str(CORPUS), *limits],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # where libFuzzer writes crash-* files
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Done 3000 runs" in done.stderr


# --------------------------------------------------------------------------- corpus writer


def write_corpus() -> None:
    CORPUS.mkdir(parents=True, exist_ok=True)
    for name, build in HOSTILE.items():
        (CORPUS / name).write_bytes(build())


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-corpus"]:
        write_corpus()
    else:
        raise SystemExit("usage: python tests/test_codec_hostile.py --write-corpus")
