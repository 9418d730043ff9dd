"""Waits of any length, leaks, processes that outlive their owner, secrets, passwords."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

import gridfuncs as gf
import pygirder
from pygirder.errors import ConfigError
from pygirder.grid.maintenance import collect_garbage
from pygirder.server import EmbeddedServer
from pygirder.store.keys import Keys

TESTS = os.path.dirname(os.path.dirname(__file__))  # gridfuncs and the other helpers
SECRET = "s" * 32


def poll(condition: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    """The first truthy value of ``condition()``; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what or condition}")
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has finished: it only waits to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return found


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read().replace(b"\0", b" ").decode(errors="replace")


def shell_env(**extra: str) -> dict[str, str]:
    path = TESTS + os.pathsep + os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=path, COLUMNS="160", **extra)


def shell_worker(url: str, namespace: str, *more: str) -> subprocess.Popen[bytes]:
    """`pygirder worker` as a shell would start it, for a grid given by URL."""
    cmd = [sys.executable, "-m", "pygirder", "worker", "--redis", url,
           "--namespace", namespace, "--import", "gridfuncs", *more]  # fmt: skip
    return subprocess.Popen(cmd, env=shell_env(), cwd=TESTS)


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- waits longer than every budget ----------------------------------------------------
@pytest.mark.slow
def test_a_call_longer_than_every_budget_returns(redis_url, monkeypatch, tmp_path):
    # today's defaults scaled down: a lost server is given up after 0.5 s, a reply
    # after 2 s, and an inbox read blocks 0.5 s; the call takes 12 s
    monkeypatch.setenv("PYGIRDER_RECONNECT_TIMEOUT", "0.5")
    monkeypatch.setenv("PYGIRDER_SOCKET_TIMEOUT", "2")
    monkeypatch.setenv("PYGIRDER_INBOX_BLOCK", "0.5")
    namespace = f"long-{uuid.uuid4().hex[:8]}"
    worker = shell_worker(redis_url, namespace)
    try:
        with pygirder.connect(redis_url, workers=0, namespace=namespace) as grid:
            grid.wait_for_workers(1, timeout=30)
            assert grid.run(gf.slow(7, 12.0, str(tmp_path / "log")), timeout=60) == 70
            assert grid.runtime.listener_restarts == 0
    finally:
        stop(worker)


class Flaky:
    """Wraps a client's method: raises the given errors once each, in order."""

    def __init__(self, real: Callable[..., Any], errors: list[BaseException]) -> None:
        self.real = real
        self.errors = list(errors)

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.errors:
            raise self.errors.pop(0)
        return await self.real(*args, **kwargs)


def test_the_inbox_listener_survives_any_error_and_restarts(grid_factory, monkeypatch):
    monkeypatch.setenv("PYGIRDER_INBOX_BLOCK", "0.2")
    grid = grid_factory(workers=1)
    assert grid.run(gf.add(1, 1), timeout=30) == 2
    client = grid.runtime._listener_client
    flaky = Flaky(
        client.send,
        [
            redis.TimeoutError("injected time-out"),
            redis.ResponseError("ERR injected"),
            RuntimeError("injected bug"),
            GeneratorExit(),  # not an Exception: it ends the listener task itself
        ],
    )
    client.send = flaky
    poll(lambda: not flaky.errors, what="the injected errors were raised")
    assert [grid.run(gf.add(i, 10), timeout=30) for i in range(3)] == [10, 11, 12]
    assert grid.runtime.listener_restarts == 1


def test_scripts_are_not_resent_after_a_socket_time_out(redis_url):
    """A reply later than the socket time-out fails the command; it is never resent."""
    import asyncio

    from pygirder.grid.connection import connect_redis
    from pygirder.store.scripts import Script

    async def go() -> tuple[type[BaseException], int]:
        os.environ["PYGIRDER_SOCKET_TIMEOUT"] = "2"
        try:
            client = await connect_redis(redis_url)
        finally:
            del os.environ["PYGIRDER_SOCKET_TIMEOUT"]
        # run as the grid runs its scripts: EVALSHA, a NOSCRIPT, SCRIPT LOAD, EVALSHA
        slow = Script(
            "slow",
            "#!lua\nredis.call('INCR', KEYS[1]); local t = redis.call('TIME')[1] + 3 "
            "while tonumber(redis.call('TIME')[1]) < t do end return 1",
        )
        try:
            await slow.run(client, ["runs"], [])
        except BaseException as exc:
            error: type[BaseException] = type(exc)
        else:
            error = type(None)
        await asyncio.sleep(2)  # the script finishes on the server
        runs = int(await client.get("runs"))
        await client.aclose()
        return error, runs

    error, runs = asyncio.run(go())
    assert error is redis.TimeoutError
    assert runs == 1


# -- map that gives up -----------------------------------------------------------------
def test_a_map_that_times_out_cancels_and_lets_go(grid_factory, tmp_path):
    grid = grid_factory(workers=1)
    log = str(tmp_path / "log")
    busy = grid.submit(gf.slow(0, 2.0, log))
    poll(lambda: "slow:0" in gf.count(log), what="the worker is busy")
    with pytest.raises(pygirder.GridTimeout, match="not yet started were cancelled"):
        grid.map(gf.slow, [(i, 0.0, log) for i in range(1, 41)], timeout=0.3)
    rt = grid.runtime
    assert set(rt._resubmit) == set(rt._waiting) == {busy.call.id}  # only the submit's
    assert not rt._interest
    assert grid.stats().get("cancelled") == 40
    assert busy.result(timeout=20) == 0
    keys = Keys(grid.namespace)
    client = redis.Redis.from_url(grid.url)
    try:  # the worker's takes drop the cancelled calls' queue entries without running them
        poll(lambda: client.llen(keys.queue("default")) == 0, what="queue entries dropped")
    finally:
        client.close()
    assert set(gf.count(log)) == {"slow:0"}


# -- gc of one namespace only ----------------------------------------------------------
def test_gc_of_a_glob_namespace_spares_the_others(redis_url):
    client = redis.Redis.from_url(redis_url)
    try:
        for ns in ("p*", "prod", "p?od", "[p]rod"):
            keys = Keys(ns)
            client.set(keys.result("a" * 40), b"O\x01")
            client.hset(keys.call("a" * 40), "fn", "x")
            client.hset(keys.state("b" * 40), mapping={"p": b"x", "s": "queued", "pool": "d"})
        time.sleep(1.1)  # OBJECT IDLETIME counts whole seconds
        report = collect_garbage(client, "p*", 0)
        assert report.dropped["results"] == 1
        assert report.dropped["abandoned requests"] == 1
        for ns in ("prod", "p?od", "[p]rod"):
            keys = Keys(ns)
            assert client.exists(keys.result("a" * 40), keys.call("a" * 40)) == 2, ns
            assert client.exists(keys.state("b" * 40)) == 1, ns
        assert not client.exists(Keys("p*").result("a" * 40))
    finally:
        client.close()


# -- secrets ---------------------------------------------------------------------------
def test_local_workers_get_the_url_from_the_environment_not_argv():
    server = EmbeddedServer(password="pw-" + uuid.uuid4().hex)
    with server, pygirder.connect(server.url, workers=1, namespace="argv") as grid:
        [pid] = grid.worker_pids()
        assert server.password not in cmdline(pid)
        assert grid.run(gf.add(2, 3), timeout=30) == 5


@pytest.mark.slow
def test_worker_processes_children_get_the_url_from_the_environment():
    with EmbeddedServer(password="pw-" + uuid.uuid4().hex) as server:
        sup = shell_worker(server.url, "argv2", "--processes", "2")
        try:
            kids = poll(lambda: len(children_of(sup.pid)) == 2 and children_of(sup.pid))
            for pid in kids:
                assert server.password not in cmdline(pid)
            with pygirder.connect(server.url, workers=0, namespace="argv2") as grid:
                grid.wait_for_workers(2, timeout=30)
                assert grid.run(gf.add(2, 3), timeout=30) == 5
            sup.kill()  # its children die with it
            sup.wait()
            poll(lambda: not any(alive(p) for p in kids), what=f"workers {kids} exited")
        finally:
            stop(sup)


@pytest.mark.parametrize(
    "command",
    [["status", "--sample", "0"], ["inspect", "0123456789ab"], ["logs"], ["dashboard"]],
)
def test_commands_never_print_the_password(command):
    with EmbeddedServer(password="right-" + uuid.uuid4().hex) as server:
        wrong = server.url.replace(server.password, "wrong-password-4711")
        out = subprocess.run(
            [sys.executable, "-m", "pygirder", *command, "--redis", wrong],
            capture_output=True, text=True, timeout=60, env=shell_env(), cwd=TESTS,
        )  # fmt: skip
    assert out.returncode != 0
    assert "cannot reach" in out.stderr
    assert "wrong-password-4711" not in out.stdout + out.stderr
    assert ":***@" in out.stderr


def test_a_short_secret_is_refused(monkeypatch, redis_url):
    monkeypatch.setenv("PYGIRDER_SECRET", "short-secret")
    with pytest.raises(ConfigError, match="at least 32") as info:
        pygirder.connect(redis_url, workers=0)
    assert "secrets.token_urlsafe" in str(info.value)


def test_a_signed_result_cannot_be_replayed_under_another_request(grid_factory, monkeypatch):
    monkeypatch.setenv("PYGIRDER_SECRET", SECRET)
    grid = grid_factory(workers=1)
    a, b = gf.third(3), gf.third(6)
    assert grid.run(a, timeout=30) == 1
    keys = Keys(grid.namespace)
    client = redis.Redis.from_url(grid.url)
    try:
        signed_for_a = client.get(keys.result(a.id))
        assert signed_for_a[:1] == b"P"
        client.set(keys.result(b.id), signed_for_a)  # replayed as b's result
    finally:
        client.close()
    with pytest.raises(pygirder.CodecError, match="HMAC does not verify"):
        grid.run(b, timeout=30)


# -- private servers: a password, a memory cap that never evicts ------------------------
def refuses_strangers(url: str) -> None:
    """A client that knows the address but not the password is refused."""
    parts = urlsplit(url)
    stranger = redis.Redis(host=parts.hostname, port=parts.port)
    try:
        with pytest.raises(redis.AuthenticationError):
            stranger.ping()
    finally:
        stranger.close()


def test_the_private_grid_has_a_password(monkeypatch):
    monkeypatch.setenv("PYGIRDER_MAXMEMORY", "256mb")
    with pygirder.connect(workers=1, namespace="private") as grid:
        password = urlsplit(grid.url).password
        assert password and len(password) >= 24
        refuses_strangers(grid.url)
        client = redis.Redis.from_url(grid.url)
        try:
            config = client.config_get("maxmemory*")
        finally:
            client.close()
        assert config["maxmemory"] == str(256 * 1024**2)
        assert config["maxmemory-policy"] == "noeviction"
        assert grid.run(gf.add(1, 2), timeout=30) == 3


def test_out_of_memory_is_a_clear_error_at_the_caller():
    server = EmbeddedServer(password="pw-" + uuid.uuid4().hex, maxmemory="4mb")
    with server, pygirder.connect(server.url, workers=0, namespace="oom") as grid:
        big = "x" * 256 * 1024
        with pytest.raises(pygirder.GridOutOfMemory) as info:
            grid.wait([gf.add(big, str(i)) for i in range(40)], timeout=5)
    message = str(info.value)
    assert "out of memory" in message and "maxmemory" in message
    assert "pygirder gc" in message and "--result-ttl" in message
    assert server.password not in message


def test_maxmemory_sizes_are_parsed_or_refused():
    from pygirder.server import parse_memory, physical_memory

    assert parse_memory("4gb") == 4 * 1024**3
    assert parse_memory("512MB") == 512 * 1024**2
    assert parse_memory(1000) == 1000
    assert parse_memory("0") == 0
    assert parse_memory("50%") == physical_memory() // 2
    for bad in ("lots", "-1gb", "150%", "4 parsecs"):
        with pytest.raises(ConfigError, match="maxmemory"):
            parse_memory(bad)


def start_cli_server(tmp_path: Any, *more: str) -> tuple[subprocess.Popen[str], str]:
    """`pygirder server` on a free port, in its own process group; returns it and its
    log line (after it serves)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pygirder", "server", "--port", "0", *more],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=shell_env(),
        cwd=tmp_path, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "valkey serving at" in line:
            return proc, line
    pytest.fail("pygirder server did not start:\n" + "".join(lines))


def test_pygirder_server_makes_a_password_and_says_where(tmp_path):
    pw_file = tmp_path / "pw"
    proc, line = start_cli_server(tmp_path, "--password-file", str(pw_file), "--maxmemory", "64mb")
    try:
        password = pw_file.read_text().strip()
        assert len(password) >= 24
        assert pw_file.stat().st_mode & 0o777 == 0o600
        assert password not in line and ":***@" in line
        assert str(pw_file) in line
        url_file = line.rsplit("$(cat ", 1)[1].split(")")[0]
        url = Path(url_file).read_text().strip()
        assert os.stat(url_file).st_mode & 0o777 == 0o600
        assert urlsplit(url).password == password
        client = redis.Redis.from_url(url)
        try:
            assert client.ping()
            assert client.config_get("maxmemory")["maxmemory"] == str(64 * 1024**2)
            assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        finally:
            client.close()
        refuses_strangers(url)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
        proc.stdout.close()


# -- children die with their owner ------------------------------------------------------
def test_a_killed_script_takes_its_server_and_workers_along(tmp_path):
    script = tmp_path / "owner.py"
    script.write_text(
        "import json, time, pygirder\n"
        "if __name__ == '__main__':\n"
        "    with pygirder.connect(workers=1, namespace='owner') as grid:\n"
        "        pids = {'server': grid._server.process.pid, 'workers': grid.worker_pids()}\n"
        "        print(json.dumps(pids), flush=True)\n"
        "        time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=shell_env()
    )
    try:
        assert proc.stdout is not None
        import json

        pids = json.loads(proc.stdout.readline())
        everyone = [pids["server"], *pids["workers"]]
        assert len(everyone) == 2 and all(alive(p) for p in everyone)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    poll(lambda: not any(alive(p) for p in everyone), what=f"{everyone} exited")


def test_killing_the_server_commands_group_takes_valkey_along(tmp_path):
    (tmp_path / "pw").write_text("pw-" + uuid.uuid4().hex)
    proc, _ = start_cli_server(tmp_path, "--password-file", str(tmp_path / "pw"))
    [valkey] = children_of(proc.pid)
    assert "valkey" in cmdline(valkey) or "redis" in cmdline(valkey)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    poll(lambda: not alive(valkey), what="valkey-server exited")


# -- a client that dies while waiting ---------------------------------------------------
def test_a_dead_clients_waits_are_withdrawn_and_counted_abandoned(
    grid_factory, monkeypatch, tmp_path
):
    monkeypatch.setenv("PYGIRDER_HEARTBEAT_TTL", "1.0")
    grid = grid_factory(workers=1)
    log, gate = str(tmp_path / "log"), tmp_path / "gate"
    # the one worker stays busy until the gate opens, however slowly the client starts
    busy = grid.submit(gf.gated(0, str(gate), log))
    poll(lambda: "gated:0" in gf.count(log), what="the worker is busy")
    # and its last blocking take has lapsed (a busy worker issues none), so the calls
    # below stay queued: none is moved to the worker while it is held at the gate
    probe = redis.Redis.from_url(grid.url)
    try:
        poll(lambda: not any(c.get("cmd") == "blmove" and "b" in c.get("flags", "")
                             for c in probe.client_list()),
             what="no blocking take outstanding")  # fmt: skip
    finally:
        probe.close()
    code = (
        "import sys, time, pygirder, gridfuncs as gf\n"
        f"g = pygirder.connect({grid.url!r}, workers=0, namespace={grid.namespace!r})\n"
        f"futures = [g.submit(gf.slow(i, 0.0, {log!r})) for i in range(1, 6)]\n"
        "print(g.runtime.process_id, flush=True)\n"
        "time.sleep(600)\n"
    )
    client = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=shell_env()
    )
    keys = Keys(grid.namespace)
    server = redis.Redis.from_url(grid.url)
    try:
        assert client.stdout is not None
        dead = client.stdout.readline().strip()
        poll(lambda: server.llen(keys.queue("default")) == 5, what="5 calls queued")
        shared = grid.submit(gf.slow(1, 0.0, log))  # someone else still waits for this one
        poll(lambda: server.scard(keys.waiters(shared.call.id)) == 2, what="two waiters")
        client.kill()
        client.wait()
        poll(lambda: grid.stats().get("abandoned") == 4, what="4 calls abandoned")
        inbox = keys.inbox(dead).encode()
        assert inbox not in server.smembers(keys.waiters(shared.call.id))
        assert not server.exists(keys.waits(dead), inbox)
        assert dead.encode() not in server.smembers(keys.waiting_processes)
        gate.touch()
        assert busy.result(timeout=20) == 0
        assert shared.result(timeout=20) == 10
        poll(lambda: server.llen(keys.queue("default")) == 0, what="queue entries dropped")
        assert set(gf.count(log)) == {"gated:0", "slow:1"}  # the abandoned ones never ran
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        client.stdout.close()
        server.close()


def test_a_live_process_trims_what_it_no_longer_waits_for(grid_factory, monkeypatch):
    monkeypatch.setenv("PYGIRDER_HEARTBEAT_TTL", "1.0")
    grid = grid_factory(workers=1)
    assert grid.map(gf.add, [(i, 100) for i in range(50)]) == [i + 100 for i in range(50)]
    keys = Keys(grid.namespace)
    server = redis.Redis.from_url(grid.url)
    try:
        poll(lambda: not server.scard(keys.waits(grid.runtime.process_id)), what="trimmed")
    finally:
        server.close()
