"""Commands of the grid's clients are packed in C (hiredis) where that gives redis-py's
own bytes, and by redis-py where it does not."""

from __future__ import annotations

import asyncio

import pytest
from redis import exceptions as redis_errors
from redis.asyncio.connection import Connection

from pygirder.grid.connection import connect_redis

pytest.importorskip("hiredis")


def _packed(conn: Connection, *args: object) -> list[bytes]:
    return conn.pack_command(*args)  # type: ignore[arg-type]


def test_packing_gives_redis_pys_bytes_and_keeps_its_errors(redis_url):
    async def main() -> None:
        client = await connect_redis(redis_url)
        try:
            conn = client.connection_pool.make_connection()
            assert isinstance(conn, Connection) and type(conn) is not Connection
            plain = Connection()
            cases = [
                ("EVALSHA", "ab" * 20, 2, "k:é", b"k2", 1.5, 1e300, -0.0, 10**20, -3, b"", ""),
                ("CONFIG GET", "maxmemory"),  # redis-py splits a name with a space
                ("SET", "big", b"v" * 100_000),  # large: sent beside the header, uncopied
                ("SET", "view", memoryview(b"xyz")),
                ("EVALSHA", "ab", 2, "k", b"b" * 7000, 3, "s" * 7000, "é" * 4000, memoryview(b"m")),
                ("EVALSHA", "ab", 1, b"x" * 6001),
            ]
            for args in cases:
                assert b"".join(_packed(conn, *args)) == b"".join(_packed(plain, *args))
            big = b"v" * 100_000
            assert any(chunk is big for chunk in _packed(conn, "SET", "big", big))  # uncopied
            with pytest.raises(redis_errors.DataError):
                _packed(conn, "SET", "k", True)
            await client.set("k", 2.5, ex=60)
            assert await client.get("k") == b"2.5"
            assert await client.execute_command("ECHO", "é") == "é".encode()
            await client.set("big", big, ex=60)
            assert await client.get("big") == big
        finally:
            await client.aclose()

    asyncio.run(main())
