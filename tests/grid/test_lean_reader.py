"""The inbox loop's lean connection answers like redis-py's client: replies, errors,
logins, databases, time-outs and lost connections, each as redis-py would raise it."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
import redis.asyncio
from redis import exceptions as redis_errors

from pygirder.grid.resp import LeanConnection, connect_reader, is_lean, pack
from pygirder.server import EmbeddedServer


def _run(coro):
    return asyncio.run(coro)


def test_pack_writes_the_server_protocol():
    assert pack(("SET", b"k", 5, 0.5)) == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n5\r\n$3\r\n0.5\r\n"
    with pytest.raises(redis_errors.DataError, match="not NoneType"):
        pack(("SET", "k", None))
    with pytest.raises(redis_errors.DataError, match="not bool"):
        pack(("SET", "k", True))


def test_replies_and_errors(valkey_server):
    async def go():
        conn = await connect_reader(valkey_server.url, block=1.0)
        assert isinstance(conn, LeanConnection)
        try:
            assert await conn.execute_command("LPUSH", "lean:box", b"a", b"b") == 2
            reply = await conn.execute_command("BLMPOP", 1.0, 1, "lean:box", "RIGHT", "COUNT", 5)
            assert reply == [b"lean:box", [b"a", b"b"]]
            start = time.monotonic()
            assert await conn.execute_command("BLMPOP", 0.2, 1, "lean:box", "RIGHT") is None
            assert time.monotonic() - start >= 0.15
            with pytest.raises(redis_errors.ResponseError, match="unknown command"):
                await conn.execute_command("NO-SUCH-COMMAND")
            assert await conn.execute_command("PING") == b"PONG"  # still in step
        finally:
            await conn.aclose()

    _run(go())


def test_password_and_database():
    with EmbeddedServer(password="lean-pw") as server:
        url = server.url.replace("/0", "/3")

        async def go():
            conn = LeanConnection(url)
            await conn.execute_command("SET", "lean:k", "v")
            await conn.aclose()
            wrong = LeanConnection(url.replace("lean-pw", "not-it"))
            with pytest.raises(redis_errors.AuthenticationError):
                await wrong.execute_command("PING")
            await wrong.aclose()

        _run(go())
        assert redis.Redis.from_url(url).get("lean:k") == b"v"
        assert redis.Redis.from_url(server.url).get("lean:k") is None


def test_a_reply_that_never_comes_times_out_and_the_next_command_reconnects(
    valkey_server, monkeypatch
):
    monkeypatch.setenv("PYGIRDER_SOCKET_TIMEOUT", "2")

    async def go():
        conn = LeanConnection(valkey_server.url, block=0.0)
        start = time.monotonic()
        with pytest.raises(redis_errors.TimeoutError, match="within 2s"):
            await conn.execute_command("BLMPOP", 0, 1, "lean:never", "RIGHT")
        assert 1.9 < time.monotonic() - start < 10
        assert await conn.execute_command("PING") == b"PONG"
        await conn.aclose()

    _run(go())


def test_a_lost_server_is_a_connection_error_until_it_is_back():
    server = EmbeddedServer().start()
    port = server.port

    async def go():
        conn = LeanConnection(server.url, block=5.0)
        read = asyncio.ensure_future(conn.execute_command("BLMPOP", 5, 1, "lean:gone", "RIGHT"))
        await asyncio.sleep(0.2)
        server.stop()
        with pytest.raises(redis_errors.ConnectionError):
            await asyncio.wait_for(read, 10)
        with pytest.raises(redis_errors.ConnectionError, match="cannot connect"):
            await conn.execute_command("PING")
        again = EmbeddedServer(port=port).start()
        try:
            assert await conn.execute_command("PING") == b"PONG"
        finally:
            await conn.aclose()
            again.stop()

    _run(go())


def test_reads_sent_back_to_back_are_answered_in_order(valkey_server):
    async def go():
        conn = LeanConnection(valkey_server.url, block=5.0)
        first = await conn.send("BLMPOP", 5, 1, "lean:two", "RIGHT", timeout=20)
        second = await conn.send("BLMPOP", 5, 1, "lean:two", "RIGHT", timeout=20)
        await asyncio.sleep(0.1)
        assert not first.done() and not second.done()  # both wait on the server
        pusher = redis.asyncio.Redis.from_url(valkey_server.url)
        await pusher.lpush("lean:two", b"m1")
        assert await asyncio.wait_for(first, 5) == [b"lean:two", [b"m1"]]
        assert not second.done()  # armed behind the first, now waiting itself
        await pusher.lpush("lean:two", b"m2")
        assert await asyncio.wait_for(second, 5) == [b"lean:two", [b"m2"]]
        await pusher.aclose()
        await conn.aclose()

    _run(go())


def test_a_cancelled_read_leaves_no_read_behind(valkey_server):
    async def go():
        conn = LeanConnection(valkey_server.url, block=5.0)
        read = asyncio.ensure_future(conn.execute_command("BLMPOP", 5, 1, "lean:c", "RIGHT"))
        await asyncio.sleep(0.2)
        read.cancel()
        with pytest.raises(asyncio.CancelledError):
            await read
        # the connection closed: the server dropped the blocked read, which pops nothing
        await asyncio.sleep(0.1)
        await conn.execute_command("LPUSH", "lean:c", b"x")
        assert await conn.execute_command("LLEN", "lean:c") == 1
        assert await conn.execute_command("BLMPOP", 1, 1, "lean:c", "RIGHT") == [b"lean:c", [b"x"]]
        await conn.aclose()

    _run(go())


def test_a_tls_url_keeps_redis_py():
    assert not is_lean("rediss://:pw@cache.example.com:6379/0")
    assert is_lean("redis://:pw@127.0.0.1:6379/0") and is_lean("unix:///run/valkey.sock")
