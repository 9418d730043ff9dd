"""A worker process that dies under a live supervisor has its requests requeued at
once by that supervisor, not when its heartbeat expires.

Every test sets the heartbeat TTL to 300 s (so the reaper runs every 75 s): a call
that finishes within the test's time-out after its worker was SIGKILLed was requeued
by the supervisor; the TTL path could not have done it in time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gridfuncs as gf
import pygirder

TESTS = str(Path(__file__).resolve().parents[1])

LONG_TTL = "300"


def _pids(log: str) -> list[int]:
    return [int(t.split(":")[1]) for t in _lines(log) if t.startswith("pid:")]


def _lines(log: str) -> list[str]:
    return Path(log).read_text().split() if os.path.exists(log) else []


def _wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _kill_the_runner_and_finish(grid: pygirder.Grid, tmp_path: Path) -> None:
    """Start a gated call, SIGKILL the process running it, check that another process
    runs it again, then let it finish; the killed worker is no longer registered."""
    log, gate = str(tmp_path / "exec.log"), str(tmp_path / "gate")
    future = grid.submit(gf.gated_pid(4, gate, log))
    _wait_for(lambda: len(_pids(log)) == 1, "the call to start")
    victim = _pids(log)[0]
    os.kill(victim, signal.SIGKILL)
    # a replacement (or the other worker) starts it again: requeued by the supervisor
    _wait_for(lambda: len(_pids(log)) == 2, "the call to be run again")
    assert _pids(log)[1] != victim
    Path(gate).touch()
    assert future.result(timeout=60) == 40
    registered = [w for w in grid.workers().values() if w.get("pid") == victim]
    assert registered == []
    assert grid.stats().get("dead_workers", 0) == 1


def test_connect_local_workers_requeue_a_killed_worker_at_once(grid_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("PYGIRDER_HEARTBEAT_TTL", LONG_TTL)
    grid = grid_factory(workers=1)
    _kill_the_runner_and_finish(grid, tmp_path)


def test_worker_processes_supervisor_requeues_a_killed_child_at_once(
    valkey_server, tmp_path, monkeypatch
):
    monkeypatch.setenv("PYGIRDER_HEARTBEAT_TTL", LONG_TTL)
    namespace = f"test-recovery-{os.getpid()}"
    env = dict(os.environ, PYTHONPATH=TESTS, PYGIRDER_REDIS=valkey_server.url)
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "pygirder", "worker", "--processes", "2", "--namespace", namespace,
         "--import", "gridfuncs", "--log-level", "WARNING"],
        env=env, cwd=TESTS, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    grid = pygirder.connect(valkey_server.url, workers=0, namespace=namespace)
    try:
        grid.wait_for_workers(2, timeout=60)
        _kill_the_runner_and_finish(grid, tmp_path)
    finally:
        grid.close()
        supervisor.terminate()
        supervisor.wait(60)


def test_a_call_that_kills_every_worker_is_still_failed_as_poison(
    grid_factory, tmp_path, monkeypatch
):
    # Each death is requeued at once and counted: the poison-pill bound still holds.
    monkeypatch.setenv("PYGIRDER_HEARTBEAT_TTL", LONG_TTL)
    monkeypatch.setenv("PYGIRDER_MAX_ATTEMPTS", "2")
    grid = grid_factory(workers=1)
    with pytest.raises(pygirder.RemoteError, match="started 2 times"):
        grid.run(gf.crash(11), timeout=60)
    assert grid.stats().get("dead_workers", 0) == 2


def test_recovery_ignores_processes_that_ran_no_worker(redis_url):
    from pygirder.grid.recovery import DeadChildRecovery

    recover = DeadChildRecovery(redis_url, "nobody-here")
    assert recover(os.getpid()) == []  # no worker of this namespace runs here
    # an unreachable server is logged, not raised: the heartbeat TTL is the backstop
    assert DeadChildRecovery("redis://127.0.0.1:1/0", timeout=2)(12345) == []
