"""Request ids and fingerprints (pygirder.hashing), and the data model's layering."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import pygirder
from pygirder import calls, codec, hashing
from pygirder.grid import context


def test_request_ids_are_stable_across_releases():
    # Changing this id loses every memoized result of every grid: it is the wire format.
    args = codec.encode({"a": 1, "b": [1.5, "x"]})
    assert hashing.request_id("m:f", "v:1", args) == "a5feefeb172090e5e95e95801bf60a42017c55fe"
    assert len(hashing.request_id("m:f", "v:1", args)) == hashing.ID_LENGTH


def test_length_prefixes_keep_name_and_fingerprint_apart():
    args = codec.encode({})
    assert hashing.request_id("m:fv", ":1", args) != hashing.request_id("m:f", "v:1", args)


def test_a_call_id_is_the_hashing_request_id():
    call = pygirder.fn(version="3")(_double)(4)
    assert call.id == hashing.request_id(call.function.name, "v:3", call.args_bytes)
    assert calls.fingerprint is hashing.fingerprint


def test_fingerprint_ignores_the_docstring_but_not_the_code():
    def a(x):
        """One."""
        return x + 1

    def b(x):
        """Two, and longer."""
        return x + 1

    def c(x):
        return x + 2

    assert hashing.fingerprint(a) == hashing.fingerprint(b) != hashing.fingerprint(c)


class _Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, list[Any], float | None]] = []

    def wait_sync(self, waited: Iterable[Any], timeout: float | None) -> list[Any]:
        items = list(waited)
        self.seen.append(("sync", items, timeout))
        return ["sync-result" for _ in items]

    async def gather_async(self, waited: Iterable[Any], timeout: float | None) -> list[Any]:
        items = list(waited)
        self.seen.append(("async", items, timeout))
        return ["async-result" for _ in items]


def test_calls_wait_through_the_registered_waiter():
    recorder = _Recorder()
    call = pygirder.fn(version="3")(_double)(5)
    calls.register_waiter(recorder)
    try:
        assert call.result(timeout=2.5) == "sync-result"
        assert asyncio.run(_await(call)) == "async-result"
    finally:
        calls.register_waiter(context.ContextWaiter())
    assert recorder.seen == [("sync", [call], 2.5), ("async", [call], None)]


def test_importing_pygirder_registers_the_grid_context():
    assert isinstance(calls._waiter, context.ContextWaiter)


async def _await(call: calls.Call[Any]) -> Any:
    return await call


def _double(x: int) -> int:
    return 2 * x


def test_a_payload_is_the_array_of_name_fingerprint_and_arguments():
    # Call.payload joins precomputed parts; it must stay the codec's own encoding of
    # the array, at every msgpack length class of the arguments (bin 8, 16 and 32).
    double = pygirder.fn(version="p")(_double)
    for value in [0, "x" * 240, "y" * 300, b"z" * 70_000, [1.5] * 8_000]:
        call = double(value)
        expected = codec.encode([call.function.name, call.function.fingerprint, call.args_bytes])
        assert call.payload() == expected
        assert codec.decode(call.payload()) == [double.name, "v:p", call.args_bytes]
    assert double(1).id == double.options(pool="other")(1).id
