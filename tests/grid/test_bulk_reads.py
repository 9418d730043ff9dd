"""Stored values read through the lent transport: every reply shape, a window of GETs
in flight, and a connection that fails or stalls under it."""

from __future__ import annotations

import asyncio
import os

import pytest
import redis
from redis import exceptions as redis_errors

from pygirder.grid import bulk
from pygirder.grid.connection import connect_redis


def _run(coro):
    return asyncio.run(coro)


def test_values_of_every_size_come_back_in_order(redis_url):
    sync = redis.Redis.from_url(redis_url)
    values = {
        "empty": b"",
        "small": b"abc",
        "crlf": b"\r\n$5\r\n" * 3,  # reply syntax inside a value is just bytes
        "medium": os.urandom(70_000),
        "large": os.urandom(3 * 1024 * 1024 + 7),
    }
    for key, value in values.items():
        sync.set(key, value)
    sync.rpush("a-list", b"x")
    keys = ["large", "missing", "empty", "small", "medium", "crlf", "large", "missing"]

    async def main():
        client = await connect_redis(redis_url, max_connections=1)
        try:
            got = await bulk.get_values(client, keys, window=2)
            # the connection is clean afterwards: an ordinary command works on it
            assert await client.get("small") == b"abc"
            with pytest.raises(redis_errors.ResponseError, match="WRONGTYPE"):
                await bulk.get_values(client, ["small", "a-list"])
            assert await client.get("small") == b"abc"
            return got, client.connection_pool
        finally:
            await client.aclose()

    got, _ = _run(main())
    assert got == [values.get(k) for k in keys]
    assert all(type(v) is bytearray for v in got if v is not None)


def test_many_small_values_pass_the_window(redis_url):
    sync = redis.Redis.from_url(redis_url)
    sync.mset({f"k{i}": str(i).encode() * (i % 7) for i in range(500)})

    async def main():
        client = await connect_redis(redis_url, max_connections=1)
        try:
            return await bulk.get_values(client, [f"k{i}" for i in range(500)])
        finally:
            await client.aclose()

    assert _run(main()) == [str(i).encode() * (i % 7) for i in range(500)]


def test_a_lost_connection_fails_the_read_and_the_client_recovers(redis_url):
    sync = redis.Redis.from_url(redis_url)
    sync.set("big", os.urandom(8 * 1024 * 1024))

    async def main():
        client = await connect_redis(redis_url, max_connections=1)
        name = f"bulk-{os.getpid()}"
        await client.client_setname(name)
        try:
            reading = asyncio.ensure_future(bulk.get_values(client, ["big"] * 8, window=1))
            await asyncio.sleep(0)
            for entry in sync.client_list():
                if entry.get("name") == name:
                    sync.client_kill_filter(_id=entry["id"])
            with pytest.raises(redis_errors.ConnectionError):
                await reading
            # the spoilt connection was dropped: the next command gets a new one
            assert len(await client.get("big")) == 8 * 1024 * 1024
        finally:
            await client.aclose()

    _run(main())


def test_a_server_that_stops_answering_is_a_timeout(redis_url, monkeypatch):
    monkeypatch.setenv("PYGIRDER_SOCKET_TIMEOUT", "2")
    sync = redis.Redis.from_url(redis_url)
    sync.set("k", b"v")

    async def main():
        client = await connect_redis(redis_url, max_connections=1)
        try:
            assert await client.get("k") == b"v"  # connected before the pause
            sync.client_pause(4000, all=True)
            with pytest.raises(redis_errors.TimeoutError, match="no bytes from the server"):
                await bulk.get_values(client, ["k"])
            sync.client_unpause()
            assert await client.get("k") == b"v"
        finally:
            sync.client_unpause()
            await client.aclose()

    _run(main())


def test_values_are_written_whole_with_or_without_an_expiry(redis_url):
    sync = redis.Redis.from_url(redis_url)
    big = os.urandom(5 * 1024 * 1024 + 3)

    async def main():
        client = await connect_redis(redis_url, max_connections=1)
        try:
            await bulk.set_value(client, "w-big", big, ex=100)
            await bulk.set_value(client, b"w-small", b"\r\n", ex=None)
            await bulk.set_value(client, "w-empty", b"", ex=None)
            assert await client.get("w-small") == b"\r\n"  # the connection is clean
        finally:
            await client.aclose()

    _run(main())
    assert sync.get("w-big") == big and 0 < sync.ttl("w-big") <= 100
    assert sync.get("w-small") == b"\r\n" and sync.ttl("w-small") == -1
    assert sync.get("w-empty") == b""


def test_a_refused_write_raises_and_leaves_the_connection_usable(redis_url):
    sync = redis.Redis.from_url(redis_url)
    before = sync.config_get("maxmemory")["maxmemory"]

    async def main():
        client = await connect_redis(redis_url, max_connections=1)
        try:
            sync.config_set("maxmemory", 1)
            with pytest.raises(redis_errors.OutOfMemoryError, match="maxmemory"):
                await bulk.set_value(client, "w-oom", os.urandom(300_000), ex=None)
            sync.config_set("maxmemory", before)
            assert await client.get("w-oom") is None
        finally:
            sync.config_set("maxmemory", before)
            await client.aclose()

    _run(main())


def test_a_server_that_stops_reading_a_write_is_a_timeout(redis_url, valkey_server, monkeypatch):
    """A hung server (stopped with SIGSTOP) stops reading: the write gives up after the
    socket time-out instead of waiting for ever, and the connection is replaced."""
    import signal

    monkeypatch.setenv("PYGIRDER_SOCKET_TIMEOUT", "2")
    pid = valkey_server.process.pid

    async def main():
        client = await connect_redis(redis_url, max_connections=1)
        try:
            await client.ping()
            os.kill(pid, signal.SIGSTOP)
            try:
                with pytest.raises(TimeoutError):
                    await bulk.set_value(client, "w-stuck", os.urandom(64 * 1024 * 1024), ex=None)
            finally:
                os.kill(pid, signal.SIGCONT)
            assert await client.ping()  # the spoilt connection was replaced
            assert await client.get("w-stuck") is None  # the cut-short SET never ran
        finally:
            await client.aclose()

    _run(main())


def test_other_commands_get_the_connection_between_large_values(redis_url):
    """A worker has one command connection: storing large results one after the other
    must let its heartbeat in between, or the heartbeat lapses and the worker looks
    dead (a bounded pool lets the releasing task take the connection straight back)."""
    value = os.urandom(1024 * 1024)

    async def main():
        client = await connect_redis(redis_url, max_connections=1)
        stored: list[int] = []
        try:

            async def store_all() -> None:
                for i in range(20):
                    await bulk.set_value(client, f"fair-{i}", value, ex=60)
                    stored.append(i)

            writer = asyncio.ensure_future(store_all())
            await asyncio.sleep(0)  # the writer holds the connection now
            await client.set("fair-beat", b"1")
            at_beat = len(stored)
            await writer
            return at_beat
        finally:
            await client.aclose()

    assert _run(main()) < 20
