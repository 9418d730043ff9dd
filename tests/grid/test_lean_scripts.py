"""A client's scripts run on a lean connection that answers and fails as redis-py's
command client does: a script the server forgot is loaded again, a full server is an
out-of-memory error, and a lost connection is ridden out for the reconnect window,
also for a command that was in flight."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
from redis import exceptions as redis_errors

import gridfuncs as gf
from pygirder.grid.resp import LeanCommands
from pygirder.server import EmbeddedServer
from pygirder.store.scripts import Script

ECHO = Script("echo", "return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1])}")


def test_a_script_the_server_forgot_is_loaded_and_run(valkey_server):
    async def go():
        conn = LeanCommands(valkey_server.url)
        try:
            assert await ECHO.run(conn, ["lean:n"], [b"x"]) == [b"lean:n", b"x", 1]
            await conn.execute_command("SCRIPT", "FLUSH")
            assert await ECHO.run(conn, ["lean:n"], [b"y"]) == [b"lean:n", b"y", 2]
            with pytest.raises(redis_errors.NoScriptError):
                await conn.evalsha("0" * 40, 0)
            with pytest.raises(redis_errors.ResponseError, match="WRONGTYPE") as caught:
                await conn.execute_command("LPUSH", "lean:n", b"v")
            assert type(caught.value) is redis_errors.ResponseError
        finally:
            await conn.aclose()

    asyncio.run(go())


def test_a_full_server_refuses_a_script_with_out_of_memory():
    with EmbeddedServer() as server:
        redis.Redis.from_url(server.url).config_set("maxmemory", 1)

        async def go():
            conn = LeanCommands(server.url)
            try:
                with pytest.raises(redis_errors.OutOfMemoryError, match="OOM"):
                    await ECHO.run(conn, ["lean:full"], [b"x"])
            finally:
                await conn.aclose()

        asyncio.run(go())


def test_a_command_in_flight_on_a_killed_connection_is_sent_again(valkey_server):
    other = redis.Redis.from_url(valkey_server.url)

    async def go():
        conn = LeanCommands(valkey_server.url)
        try:
            assert await conn.execute_command("CLIENT", "SETNAME", "lean-retry") == b"OK"
            read = asyncio.ensure_future(
                conn.execute_command("BLMPOP", 5, 1, "lean:retry", "RIGHT")
            )
            await asyncio.sleep(0.2)
            [target] = [c["id"] for c in other.client_list() if c["name"] == "lean-retry"]
            assert other.client_kill_filter(_id=target) == 1
            await asyncio.sleep(0.3)  # the new connection's read waits on the server now
            other.lpush("lean:retry", b"after")
            assert await asyncio.wait_for(read, 10) == [b"lean:retry", [b"after"]]
        finally:
            await conn.aclose()

    asyncio.run(go())


def test_a_server_back_within_the_window_is_reached_and_one_gone_longer_is_an_error():
    server = EmbeddedServer().start()
    port = server.port

    async def go():
        conn = LeanCommands(server.url, reconnect_timeout=1.0)
        try:
            assert await conn.execute_command("PING") == b"PONG"
            server.stop()
            start = time.monotonic()
            with pytest.raises(redis_errors.ConnectionError):
                await conn.execute_command("PING")
            assert 0.03 < time.monotonic() - start < 10  # backed off, then gave up
            pending = asyncio.ensure_future(conn.execute_command("PING"))
            await asyncio.sleep(0.05)
            again = EmbeddedServer(port=port).start()  # back before its retries run out
            try:
                assert await asyncio.wait_for(pending, 10) == b"PONG"
            finally:
                again.stop()
        finally:
            await conn.aclose()

    asyncio.run(go())


def test_a_wrong_password_is_not_retried():
    with EmbeddedServer(password="lean-pw") as server:

        async def go():
            conn = LeanCommands(server.url.replace("lean-pw", "not-it"), reconnect_timeout=60)
            start = time.monotonic()
            with pytest.raises(redis_errors.AuthenticationError):
                await conn.execute_command("PING")
            assert time.monotonic() - start < 5
            await conn.aclose()

        asyncio.run(go())


def test_a_clients_scripts_travel_on_a_connection_of_their_own(grid_factory, valkey_server):
    grid = grid_factory(workers=1)
    assert grid.map(gf.add, [(i, 1) for i in range(50)]) == [i + 1 for i in range(50)]
    clients = redis.Redis.from_url(valkey_server.url).client_list()
    # redis-py names its library on each connection it opens; the lean ones do not.  A
    # worker's scripts stay on its redis-py client and an inbox's last command is a
    # read, so a lean connection whose last command ran a script is the client's.
    assert [c for c in clients if not c["lib-name"] and c["cmd"] == "evalsha"]
