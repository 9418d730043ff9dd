"""Large bytes results held as themselves: a worker writes the envelope's head and the
value as two pieces, a reader makes the value straight from the bytes it read into a
reused buffer, and every other envelope (hostile ones included) decodes as before."""

from __future__ import annotations

import asyncio
import os

import pytest
import redis

import gridfuncs as gf
from pygirder.errors import CodecError, PayloadTooLarge, RemoteError
from pygirder.grid import bulk
from pygirder.grid.connection import connect_redis
from pygirder.grid.protocol import (
    BytesEnvelope,
    decode_envelope,
    encode_error,
    encode_ok,
    encode_result,
    settle,
)
from pygirder.store.keys import Keys

BIG = 200_000


def test_a_held_value_is_the_envelope_encode_ok_makes():
    value = os.urandom(BIG)
    held = encode_result(value, name="f", limit=None)
    assert type(held) is BytesEnvelope and held.value is value
    assert bytes(held) == encode_ok(value, name="f", limit=None)
    assert len(held) == len(bytes(held))
    assert b"".join(held.parts()) == bytes(held)
    assert decode_envelope(held) is value


def test_small_and_other_values_are_encoded_as_before():
    for value in (b"x" * 1000, [b"x" * BIG], "s" * BIG):
        envelope = encode_result(value, name="f", limit=None)
        assert type(envelope) is bytes and envelope == encode_ok(value, name="f", limit=None)


def test_a_held_value_keeps_the_result_limit():
    limit = BIG + 5  # the encoding without its OK byte: the bin 32 header and the value
    assert type(encode_result(b"x" * BIG, name="f", limit=limit)) is BytesEnvelope
    with pytest.raises(PayloadTooLarge):
        encode_result(b"x" * (BIG + 1), name="f", limit=limit)


def test_settle_makes_a_large_bytes_envelope_its_value():
    value = os.urandom(BIG)
    settled = settle(memoryview(encode_ok(value, name="f", limit=None)))
    assert type(settled) is BytesEnvelope and settled.value == value
    assert type(settled.value) is bytes and bytes(settled) == encode_ok(value, name="f", limit=None)


@pytest.mark.parametrize(
    "envelope",
    [
        encode_ok(b"x" * 1000, name="f", limit=None),  # small
        encode_ok([b"x" * BIG], name="f", limit=None),  # not a top-level bytes value
        encode_error(RemoteError("ValueError", "x" * BIG, "", [])),
    ],
)
def test_settle_copies_every_other_envelope(envelope):
    settled = settle(memoryview(bytearray(envelope)))
    assert type(settled) is bytes and settled == envelope


@pytest.mark.parametrize(
    "envelope",
    [
        # a bin 32 header that declares more, or fewer, bytes than follow
        b"O\xc6" + (BIG + 1).to_bytes(4, "big") + b"x" * BIG,
        b"O\xc6" + (BIG - 1).to_bytes(4, "big") + b"x" * BIG,
        b"Z\xc6" + BIG.to_bytes(4, "big") + b"x" * BIG,  # not an OK envelope
    ],
)
def test_a_lying_envelope_is_not_taken_for_a_value(envelope):
    settled = settle(memoryview(envelope))
    assert type(settled) is bytes and settled == envelope
    with pytest.raises(CodecError):
        decode_envelope(settled)


def test_set_value_stores_the_parts_as_one_value(redis_url):
    head, body = b"O\xc6" + BIG.to_bytes(4, "big"), os.urandom(BIG)

    async def main():
        client = await connect_redis(redis_url, max_connections=1)
        try:
            await bulk.set_value(client, "parts", (head, body), ex=60)
            await bulk.set_value(client, "one", body, ex=None)
        finally:
            await client.aclose()

    asyncio.run(main())
    sync = redis.Redis.from_url(redis_url)
    assert sync.get("parts") == head + body and sync.ttl("parts") > 0
    assert sync.get("one") == body and sync.ttl("one") == -1


def test_converted_reads_on_two_connections_at_once_do_not_share_a_buffer(redis_url):
    """Batches read at the same time on one thread each fill a buffer of their own."""
    sync = redis.Redis.from_url(redis_url)
    values = {f"v{i}": os.urandom(300_000 + 1000 * i) for i in range(12)}
    sync.mset(values)
    names = list(values)

    async def main():
        first = await connect_redis(redis_url, max_connections=1)
        second = await connect_redis(redis_url, max_connections=1)
        try:
            return await asyncio.gather(
                bulk.get_values(first, names, convert=bytes),
                bulk.get_values(second, [*names[::-1], "missing"], convert=bytes),
                bulk.get_values(first, names[:3], convert=bytes),
            )
        finally:
            await first.aclose()
            await second.aclose()

    one, two, three = asyncio.run(main())
    assert one == [values[k] for k in names]
    assert two == [values[k] for k in names[::-1]] + [None]
    assert three == [values[k] for k in names[:3]]
    assert all(type(v) is bytes for v in one)


def test_a_convert_that_fails_fails_the_batch_and_spoils_nothing(redis_url):
    sync = redis.Redis.from_url(redis_url)
    sync.mset({"a": b"a" * BIG, "b": b"b" * BIG})

    def refuse(view: memoryview) -> bytes:
        raise ValueError("no")

    async def main():
        client = await connect_redis(redis_url, max_connections=1)
        try:
            with pytest.raises(ValueError, match="no"):
                await bulk.get_values(client, ["a", "b"], convert=refuse)
            return await bulk.get_values(client, ["b", "a"], convert=bytes)
        finally:
            await client.aclose()

    assert asyncio.run(main()) == [b"b" * BIG, b"a" * BIG]


def test_large_bytes_results_come_back_equal_and_shared(grid_factory, valkey_server):
    grid = grid_factory(workers=1)
    calls = [gf.big_bytes(BIG + i) for i in range(3)]
    assert grid.wait(calls) == [b"x" * (BIG + i) for i in range(3)]
    # what the server holds is the envelope every other reader expects
    stored = redis.Redis.from_url(valkey_server.url).get(Keys(grid.namespace).result(calls[0].id))
    assert stored == encode_ok(b"x" * BIG, name="big_bytes", limit=None)
    # a later call of this process is answered from its cache: the same immutable value
    assert grid.run(calls[1]) is grid.run(calls[1])


def test_large_bytes_results_reach_the_durable_store(grid_factory, tmp_path):
    first = grid_factory(workers=1, store=tmp_path / "store")
    assert first.run(gf.big_bytes(BIG)) == b"x" * BIG
    first.close()  # its worker writes what it has not written yet before it exits
    # another namespace, with nothing in Valkey: only the store can answer
    second = grid_factory(workers=1, store=tmp_path / "store")
    assert second.run(gf.big_bytes(BIG)) == b"x" * BIG
    assert second.stats().get("restored") == 1
