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
