"""Hostile user code and a failing server cost one call an error, never the worker.

Calls that exit, crash, spin or return what the server cannot store each end in a clear
error at the caller, within a bounded time, and the worker goes on serving.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest
import redis

import hostilefuncs as hf
import pygirder
from pygirder.grid.worker import Threads, Worker, WorkerOptions
from pygirder.server import EmbeddedServer
from pygirder.store import scripts
from pygirder.store.keys import Keys

TESTS = os.path.dirname(os.path.dirname(__file__))  # gridfuncs and the other helpers


@pytest.fixture(autouse=True)
def fast_liveness(monkeypatch):
    monkeypatch.setenv("PYGIRDER_HEARTBEAT_TTL", "1.0")
    monkeypatch.setenv("PYGIRDER_MAX_ATTEMPTS", "2")


KINDS = ["SystemExit", "KeyboardInterrupt", "GeneratorExit", "Custom", "CancelledError"]


def test_base_exceptions_from_user_code_are_errors_and_the_worker_lives(grid_factory):
    grid = grid_factory(workers=1)
    for i, kind in enumerate(KINDS):
        for func in (hf.raises, hf.araises):
            with pytest.raises(pygirder.RemoteError) as info:
                grid.run(func(kind), timeout=15)
            assert info.value.remote_type.endswith(kind), (func, info.value)
            assert grid.run(hf.inc(i), timeout=15) == i + 1  # the same worker serves on
    assert grid._supervisor.restarts == 0


# dies: os._exit, no cleanup at all (the reaper finds it).  tears_down_loop: an exit in
# the event loop itself, outside the call's frames; the worker's own shutdown then hands
# the work back, and must count the strike too or the call would run for ever.
@pytest.mark.parametrize("func", [hf.dies, hf.tears_down_loop], ids=["os_exit", "loop_exit"])
def test_a_call_that_ends_its_process_is_poison_after_max_attempts(grid_factory, func):
    grid = grid_factory(workers=1)
    with pytest.raises(pygirder.RemoteError) as info:
        grid.run(func(1), timeout=60)
    assert info.value.remote_type == "pygirder.PoisonRequest"
    assert f"{func.name} was started 2 times" in info.value.message
    assert grid.run(hf.inc(1), timeout=30) == 2


def test_an_id_that_is_not_text_is_dead_lettered(grid_factory):
    grid = grid_factory(workers=1)
    keys = Keys(grid.namespace)
    junk = b"\xff\xfe not utf-8 \x80"
    client = redis.Redis.from_url(grid.url)
    try:
        payload = hf.inc(1).payload()
        client.hset(keys.prefix.encode() + b"st:" + junk,
                    mapping={"p": payload, "s": "queued", "pool": "default"})  # fmt: skip
        client.lpush(keys.queue("default"), junk)
        assert grid.run(hf.inc(5), timeout=15) == 6
        deadline = time.monotonic() + 10
        while client.llen(keys.dead_letters) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        letters = client.lrange(keys.dead_letters, 0, -1)
        assert any(b"undecodable id" in entry for entry in letters), letters
        assert junk not in client.lrange(keys.queue("default"), 0, -1)
        assert not client.exists(keys.prefix.encode() + b"st:" + junk)
    finally:
        client.close()
    assert grid._supervisor.restarts == 0


def test_sync_chain_deeper_than_the_kept_threads_completes(grid_factory, monkeypatch):
    monkeypatch.setenv("PYGIRDER_IDLE_THREADS", "4")
    grid = grid_factory(workers=1)
    assert grid.run(hf.sync_chain(20), timeout=60) == 20
    assert grid.run(hf.sync_chain(30), timeout=60) == 30  # reuses what the first left


def test_threads_start_when_none_is_free_and_idle_ones_expire():
    threads = Threads(keep=2, idle_s=0.2)
    release = threading.Event()
    started = []
    futures = [threads.submit(lambda i=i: (started.append(i), release.wait(10))) for i in range(20)]
    deadline = time.monotonic() + 10
    while len(started) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(started) == 20  # none queued behind the 19 that block
    release.set()
    assert all(f.result(10)[1] for f in futures)
    deadline = time.monotonic() + 10
    while threads.alive > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threads.alive == 0  # 18 exited at once, the 2 kept ones after idle_s
    assert threads.submit(lambda: 7).result(10) == 7
    threads.shutdown()


class InProcessWorker:
    """A worker on a thread of this process, so a test can wrap its server calls."""

    def __init__(self, url: str, namespace: str) -> None:
        # no execution limit: a call over one would re-execute this (the test) process
        self.worker = Worker(
            url, WorkerOptions(namespace=namespace, imports=("hostilefuncs",), max_runtime=0)
        )
        self.thread = threading.Thread(target=lambda: asyncio.run(self.worker.run()), daemon=True)

    def __enter__(self) -> Worker:
        self.thread.start()
        return self.worker

    def __exit__(self, *exc: object) -> None:
        deadline = time.monotonic() + 10
        while self.worker.loop is None and time.monotonic() < deadline:
            time.sleep(0.01)
        self.worker.loop.call_soon_threadsafe(self.worker.stop)
        self.thread.join(30)


def test_storing_results_is_retried_after_transient_errors(valkey_server):
    namespace = f"test-{uuid.uuid4().hex[:10]}"
    failures = {"left": 3}
    with InProcessWorker(valkey_server.url, namespace) as worker:
        original = worker.runtime.run_script

        async def flaky(script, keys, args):
            if script is scripts.COMPLETE and failures["left"] > 0:
                failures["left"] -= 1
                raise redis.exceptions.ResponseError("BUSY Redis is busy running a script")
            return await original(script, keys, args)

        worker.runtime.run_script = flaky
        with pygirder.connect(valkey_server.url, workers=0, namespace=namespace) as grid:
            grid.wait_for_workers(1, timeout=30)
            assert grid.run(hf.inc(41), timeout=30) == 42
    assert failures["left"] == 0


def test_a_batch_of_results_the_server_refuses_is_split(valkey_server):
    namespace = f"test-{uuid.uuid4().hex[:10]}"
    batches = []
    with InProcessWorker(valkey_server.url, namespace) as worker:
        original = worker.runtime.run_script

        async def refuses_batches(script, keys, args):
            if script is scripts.COMPLETE:
                batches.append((len(args) - 3) // 5)
                if batches[-1] > 1:  # a server limit no retry can pass
                    raise redis.exceptions.ResponseError("ERR batch over the server's limits")
            return await original(script, keys, args)

        worker.runtime.run_script = refuses_batches
        with pygirder.connect(valkey_server.url, workers=0, namespace=namespace) as grid:
            grid.wait_for_workers(1, timeout=30)
            values = list(grid.map(hf.inc, [(i,) for i in range(200)], timeout=60))
    assert values == [i + 1 for i in range(200)]
    assert max(batches) > 1  # batches were refused, and their results still arrived


def test_a_result_the_server_cannot_store_is_a_clear_error():
    server = EmbeddedServer(
        extra_args=["--maxmemory", "16mb", "--maxmemory-policy", "noeviction"]
    ).start()
    try:
        with pygirder.connect(server.url, workers=1, namespace="oom") as grid:
            with pytest.raises(pygirder.RemoteError) as info:
                grid.run(hf.big_result(40 * 1024 * 1024), timeout=60)
            err = info.value
            assert err.remote_type == "pygirder.ResultNotStored", err
            assert "maxmemory" in err.message and "hostilefuncs:big_result" in err.message
            # the server frees the refused command's buffers in its own time (its
            # client cron): until then every write is refused, to callers too
            probe = redis.Redis.from_url(server.url)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    probe.set(b"probe", b"1")
                    break
                except redis.exceptions.OutOfMemoryError:
                    time.sleep(0.2)
            used = probe.info("memory")["used_memory"]
            buffers = [(c["cmd"], c["qbuf"], c["tot-mem"]) for c in probe.client_list()]
            probe.close()
            assert used < 16 * 1024 * 1024, buffers  # nothing big was kept
            assert grid.run(hf.inc(1), timeout=30) == 2
    finally:
        server.stop()


@pytest.mark.parametrize("func", [hf.spin, hf.aspin], ids=["sync", "async"])
def test_a_call_over_its_max_runtime_fails_and_the_worker_comes_back(grid_factory, func):
    grid = grid_factory(workers=1)
    started = time.monotonic()
    with pytest.raises(pygirder.RemoteError) as info:
        grid.run(func(1), timeout=30)
    assert time.monotonic() - started < 25
    err = info.value
    assert err.remote_type == "pygirder.MaxRuntimeExceeded"
    assert "max_runtime of 1 s" in err.message and func.name in err.message
    assert grid.run(hf.inc(1), timeout=30) == 2
    assert grid.stats().get("requeued", 0) == 0  # failed once, not retried


def test_calls_parked_behind_an_over_running_call_are_handed_back(grid_factory):
    grid = grid_factory(workers=1)
    with pytest.raises(pygirder.RemoteError) as info:
        grid.run(hf.waits_on_spin(1), timeout=45)
    err = info.value
    assert err.remote_type == "pygirder.MaxRuntimeExceeded"
    assert [link.function for link in err.chain] == [hf.spin.name, hf.waits_on_spin.name]
    assert grid.stats().get("requeued", 0) >= 1  # the parent was handed back and rerun


def test_worker_command_default_max_runtime_and_restart_without_supervisor(grid_factory):
    grid = grid_factory(workers=0)
    env = dict(os.environ, PYTHONPATH=TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "pygirder", "worker", "--redis", grid.url, "--namespace",
           grid.namespace, "--import", "hostilefuncs", "--max-runtime", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        grid.wait_for_workers(1, timeout=30)
        with pytest.raises(pygirder.RemoteError) as info:
            grid.run(hf.spin_unlimited(1), timeout=30)
        assert info.value.remote_type == "pygirder.MaxRuntimeExceeded"
        assert "max_runtime of 1 s" in info.value.message
        assert grid.run(hf.inc(3), timeout=30) == 4  # the same process, executed afresh
        assert proc.poll() is None
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_max_runtime_must_be_positive_and_does_not_change_ids(monkeypatch):
    with pytest.raises(pygirder.GridFunctionError, match="max_runtime"):
        pygirder.fn(max_runtime=0)(hf.inc.func)
    monkeypatch.setitem(pygirder.calls._REGISTRY, hf.spin.name, hf.spin)  # restored after
    assert hf.spin(1).id == pygirder.fn(hf.spin.func)(1).id


def test_a_thread_run_settles_its_loop_future_with_what_it_returned_or_raised():
    threads = Threads(keep=1, idle_s=5)

    def stop() -> None:
        raise KeyboardInterrupt

    async def main() -> int:
        loop = asyncio.get_running_loop()
        value = await threads.run_soon(loop, lambda: 7)
        with pytest.raises(ValueError, match="boom"):
            await threads.run_soon(loop, lambda: int("boom"))
        # a BaseException is handed over as it is (the worker's own guard turns user
        # code's into errors before it gets here)
        with pytest.raises(KeyboardInterrupt):
            await threads.run_soon(loop, stop)
        return value

    try:
        assert asyncio.run(main()) == 7
    finally:
        threads.shutdown()
