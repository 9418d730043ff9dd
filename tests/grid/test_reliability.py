"""Nothing lost when processes die or the server restarts; nothing runs that should not."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gridfuncs as gf
import pygirder
from pygirder.server import EmbeddedServer
from pygirder.store.keys import Keys

TESTS = os.path.dirname(os.path.dirname(__file__))  # gridfuncs and the other helpers


@pytest.fixture(autouse=True)
def fast_liveness(monkeypatch):
    """Short heartbeats so a dead worker is noticed in about a second (workers inherit it)."""
    monkeypatch.setenv("PYGIRDER_HEARTBEAT_TTL", "1.0")
    monkeypatch.setenv("PYGIRDER_MAX_ATTEMPTS", "3")


def run_in_thread(fn):
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # reported by the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def tree_size(depth: int, fanout: int) -> int:
    return sum(fanout**d for d in range(depth + 1))


@pytest.mark.slow
def test_chaos_sigkill_workers_loses_nothing(grid_factory):
    grid = grid_factory(workers=3)
    depth, fanout = 7, 3  # 3,280 calls
    started = time.monotonic()
    thread, box = run_in_thread(lambda: grid.run(gf.chaos_tree(depth, fanout, 0, 0.002), 150))
    rng = random.Random(7)
    kills = 0
    while thread.is_alive() and kills < 6:
        time.sleep(rng.uniform(0.3, 0.9))
        pids = grid.worker_pids()
        if pids and thread.is_alive():
            os.kill(rng.choice(pids), signal.SIGKILL)
            kills += 1
    thread.join(150)
    elapsed = time.monotonic() - started
    assert "error" not in box, box.get("error")
    assert box["result"] == tree_size(depth, fanout)  # exact: no call lost or doubled in
    assert kills >= 3
    assert elapsed < 120, f"chaos run took {elapsed:.1f}s"
    assert grid.stats().get("dead_workers", 0) >= 1


@pytest.mark.slow
def test_killed_client_then_rerun_reuses_finished_work(grid_factory, tmp_path, monkeypatch):
    # No worker dies here, so liveness need not be fast: with a 1 s heartbeat a worker
    # starved of CPU on a loaded machine is taken for dead and its calls run twice.
    monkeypatch.setenv("PYGIRDER_HEARTBEAT_TTL", "10")
    grid = grid_factory(workers=2)
    log = str(tmp_path / "exec.log")
    code = (
        "import sys, pygirder, gridfuncs as gf\n"
        f"g = pygirder.connect({grid.url!r}, workers=0, namespace={grid.namespace!r})\n"
        f"g.run(gf.chaos_tree(5, 3, 0, 0.01, {log!r}))\n"
    )
    client = subprocess.Popen([sys.executable, "-c", code], cwd=TESTS)
    deadline = time.monotonic() + 30
    while len(gf.count(log)) < 60 and time.monotonic() < deadline:
        time.sleep(0.02)
    client.kill()
    client.wait()
    done_before = len(gf.count(log))
    assert 0 < done_before < tree_size(5, 3)
    assert grid.run(gf.chaos_tree(5, 3, 0, 0.01, log), timeout=60) == tree_size(5, 3)
    counts = gf.count(log)
    assert len(counts) == tree_size(5, 3)
    assert set(counts.values()) == {1}  # what ran before the client died was not run again


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_server_restart_mid_run_completes(tmp_path):
    port = _free_port()
    server = EmbeddedServer(port=port).start()
    grid = pygirder.connect(server.url, workers=2, namespace="restart")
    log = str(tmp_path / "exec.log")
    try:
        tree = gf.chaos_tree(5, 3, 0, 0.01, log)
        thread, box = run_in_thread(lambda: grid.run(tree, timeout=90))
        deadline = time.monotonic() + 30
        while len(gf.count(log)) < 40:  # well under way, and far from done (364 calls)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert thread.is_alive()
        server.stop()  # empty restart: no persistence
        time.sleep(0.5)
        server = EmbeddedServer(port=port).start()
        thread.join(90)
        assert "error" not in box, box.get("error")
        assert box["result"] == tree_size(5, 3)
    finally:
        grid.close()
        server.stop()


@pytest.fixture
def one_worker_grid(grid_factory):
    return grid_factory(workers=1)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(junk=st.lists(st.binary(max_size=64), min_size=1, max_size=5))
def test_garbage_in_the_queue_is_dead_lettered_and_the_worker_survives(one_worker_grid, junk):
    grid = one_worker_grid
    keys = Keys(grid.namespace)
    client = redis.Redis.from_url(grid.url)
    try:
        for payload in junk:
            request_id = uuid.uuid4().hex + "00000000"
            client.hset(
                keys.state(request_id), mapping={"p": payload, "s": "queued", "pool": "default"}
            )
            client.lpush(keys.queue("default"), request_id)
            client.lpush(keys.queue("default"), payload)  # an id that names nothing
        assert grid.run(gf.add(len(junk), 1), timeout=30) == len(junk) + 1
        assert client.llen(keys.dead_letters) >= 1
    finally:
        client.close()
    assert grid._supervisor.restarts == 0  # the worker never crashed


def test_cycle_through_two_functions_is_named(grid_factory):
    grid = grid_factory(workers=2)
    with pytest.raises(pygirder.RemoteError) as info:
        grid.run(gf.cyc_a(1), timeout=30)
    err = info.value
    assert err.remote_type.endswith("GridCycleError")
    assert "gridfuncs:cyc_a" in err.message and "gridfuncs:cyc_b" in err.message


@pytest.mark.slow
def test_poison_request_fails_after_bounded_attempts(grid_factory):
    grid = grid_factory(workers=2)
    started = time.monotonic()
    with pytest.raises(pygirder.RemoteError) as info:
        grid.run(gf.crash_parent(1), timeout=60)
    err = info.value
    assert err.remote_type == "pygirder.PoisonRequest"
    assert "gridfuncs:crash was started 3 times" in err.message
    # the parent is not blamed: it fails because its child did
    assert [link.function for link in err.chain] == ["gridfuncs:crash", "gridfuncs:crash_parent"]
    assert time.monotonic() - started < 45


def test_cancel_and_timeout_drop_calls_that_have_not_started(one_worker_grid, tmp_path):
    grid = one_worker_grid
    log, gate = str(tmp_path / "exec.log"), str(tmp_path / "gate")
    busy = grid.submit(gf.gated(1, gate, log))  # holds the only worker until the gate opens
    deadline = time.monotonic() + 10
    while "gated:1" not in gf.count(log) and time.monotonic() < deadline:
        time.sleep(0.01)
    client = redis.Redis.from_url(grid.url)
    try:
        call = gf.slow(2, 0.0, log)
        queued = grid.submit(call)
        state = Keys(grid.namespace).state(call.id)
        while client.hget(state, "s") != b"queued":  # on the server before it is cancelled
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        client.close()
    assert queued.cancel()
    with pytest.raises(pygirder.GridTimeout, match="not yet started were cancelled"):
        grid.run(gf.slow(3, 0.0, log), timeout=0.2)
    open(gate, "w").close()
    assert busy.result(timeout=10) == 10
    assert grid.run(gf.add(5), timeout=10) == 5  # the worker moved on, past both entries
    assert gf.count(log) == {"gated:1": 1}
    assert grid.stats().get("cancelled") == 2


@pytest.mark.slow
def test_sigterm_hands_back_work_and_exits_zero(grid_factory, tmp_path):
    grid = grid_factory(workers=0)
    env = dict(os.environ, PYTHONPATH=TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "pygirder", "worker", "--redis", grid.url,
           "--namespace", grid.namespace, "--import", "gridfuncs"]  # fmt: skip
    first = subprocess.Popen(cmd, env=env)
    grid.wait_for_workers(1, timeout=30)
    log = str(tmp_path / "exec.log")
    thread, box = run_in_thread(lambda: grid.run(gf.chaos_tree(4, 3, 0, 0.02, log), timeout=60))
    deadline = time.monotonic() + 30
    while len(gf.count(log)) < 20:  # well under way, and far from done (121 calls)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    first.send_signal(signal.SIGTERM)
    assert first.wait(30) == 0
    assert thread.is_alive()  # handed back, not finished
    second = subprocess.Popen(cmd, env=env)
    try:
        thread.join(60)
        assert "error" not in box, box.get("error")
        assert box["result"] == tree_size(4, 3)
        assert grid.stats().get("requeued", 0) >= 1
    finally:
        second.terminate()
        second.wait(30)


def test_oversize_result_is_a_clear_error(grid_factory, monkeypatch):
    monkeypatch.setenv("PYGIRDER_MAX_RESULT_BYTES", str(1024 * 1024))
    grid = grid_factory(workers=1)
    assert len(grid.run(gf.big_bytes(1000))) == 1000
    with pytest.raises(pygirder.RemoteError) as info:
        grid.run(gf.big_bytes(2 * 1024 * 1024), timeout=30)
    assert info.value.remote_type == "pygirder.PayloadTooLarge"
    assert "1.0 MiB" in info.value.message or "1048576" in info.value.message


def test_wrong_or_missing_password_is_a_clear_error():
    with EmbeddedServer(password="right-password") as server:
        bad = server.url.replace("right-password", "wrong-password")
        with pytest.raises(pygirder.GridConnectionError, match="refused the credentials") as info:
            pygirder.connect(bad, workers=0)
        assert "wrong-password" not in str(info.value)
        with pytest.raises(pygirder.GridConnectionError, match="requires a password"):
            pygirder.connect(server.url.replace(":right-password@", ""), workers=0)
        with pygirder.connect(server.url, workers=1, namespace="auth") as grid:
            assert grid.run(gf.add(2, 2), timeout=30) == 4


def test_unreachable_server_fails_fast():
    started = time.monotonic()
    with pytest.raises(pygirder.GridConnectionError, match="cannot reach"):
        pygirder.connect(f"redis://127.0.0.1:{_free_port()}/0", workers=0)
    assert time.monotonic() - started < 10


def test_opt_in_pickle_results_are_signed(grid_factory, monkeypatch):
    from fractions import Fraction

    # without a shared secret, such a result is a clear error
    plain = grid_factory(workers=1)
    with pytest.raises(pygirder.RemoteError, match="Fraction"):
        plain.run(gf.third(1), timeout=30)
    monkeypatch.setenv("PYGIRDER_SECRET", "grid-secret-" * 3)
    grid = grid_factory(workers=1)  # its workers inherit the secret
    assert grid.run(gf.third(3), timeout=30) == Fraction(1)
    monkeypatch.setenv("PYGIRDER_SECRET", "another-secret-" * 3)
    with pytest.raises(pygirder.CodecError, match="HMAC does not verify"):
        grid.run(gf.third(6), timeout=30)
    monkeypatch.delenv("PYGIRDER_SECRET")
    with pytest.raises(pygirder.CodecError, match="no PYGIRDER_SECRET"):
        grid.run(gf.third(9), timeout=30)
