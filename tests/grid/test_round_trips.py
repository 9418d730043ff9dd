"""Round trips of one isolated call, counted by the server (``INFO commandstats``).

An idle worker is handed a new call by the submit script itself (claimed for it and
pushed to its inbox), and its completion marks it idle again; so one call costs the
client its submit and the reply of its inbox read, and the worker the reply of its
inbox read and its completion: two scripts and two blocking reads that were already
waiting.  Commands a script runs are counted under their own names, not as round
trips.  Background traffic (heartbeats, blocking reads that time out) adds a few
commands per second, far below one per call.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

import gridfuncs as gf
import pygirder
from pygirder.server import EmbeddedServer

CALLS = 40
# what a process sends itself, as bench/ counts it (the server counts the commands a
# script runs under their own names: GET, HSET... are left out for that reason)
ROUND_TRIPS = ("evalsha", "eval", "blmove", "blmpop", "mget")
TESTS = Path(__file__).resolve().parents[1]
IDLE = "pg:{rt}:idle:default"


@pytest.fixture
def server() -> Iterator[EmbeddedServer]:
    with EmbeddedServer() as srv:
        yield srv


@pytest.fixture
def client(server: EmbeddedServer) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(server.url)
    yield c
    c.close()


@pytest.fixture
def grid(server: EmbeddedServer) -> Iterator[pygirder.Grid]:
    with pygirder.connect(server.url, workers=0, namespace="rt", store=None) as g:
        yield g


@pytest.fixture
def start_worker(server: EmbeddedServer) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Worker processes of the grid, killed at the end if still running."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(heartbeat_ttl: float = 1.0) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYGIRDER_STORE": "off", "PYGIRDER_HEARTBEAT_TTL": str(heartbeat_ttl),
               "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}  # fmt: skip
        cmd = [sys.executable, "-m", "pygirder", "worker", "--redis", server.url,
               "--namespace", "rt", "--import", "gridfuncs"]  # fmt: skip
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def wait_until(predicate: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def calls_by_command(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def test_an_isolated_call_costs_two_scripts_and_two_blocking_reads(grid, client, start_worker):
    start_worker()
    grid.wait_for_workers(1)
    salt = uuid.uuid4().int % 10**9
    for i in range(5):  # warm: scripts loaded, the worker waiting for work
        assert grid.run(gf.add(i, salt), timeout=30) == i + salt
    time.sleep(0.2)
    before = calls_by_command(client)
    for i in range(CALLS):  # each call after the last one returned
        assert grid.run(gf.add(i, salt + 1), timeout=30) == i + salt + 1
    after = calls_by_command(client)
    per_call = {c: (after.get(c, 0) - before.get(c, 0)) / CALLS for c in ROUND_TRIPS}
    # a few background commands (a timed-out blocking read, a heartbeat) may fall in
    slack = 4 / CALLS
    assert per_call["evalsha"] <= 2 + slack, per_call  # the submit, the completion
    assert per_call["blmpop"] <= 2 + slack, per_call  # the worker's and the client's inbox
    assert per_call["blmove"] <= slack, per_call  # no blocking move off the pool queue
    assert per_call["mget"] <= slack, per_call  # small results come inline
    assert sum(per_call.values()) <= 4 + 2 * slack, per_call
    assert grid.stats()["handed"] >= CALLS  # every one skipped the queue


def test_a_worker_that_stops_takes_its_idle_mark_with_it(grid, client, start_worker):
    worker = start_worker()
    grid.wait_for_workers(1)
    assert grid.run(gf.add(1, 2), timeout=30) == 3
    wait_until(lambda: client.hgetall(IDLE), "the worker marks itself idle")
    worker.terminate()  # graceful: it takes its mark away before it hands work back
    assert worker.wait(30) == 0
    assert not client.hgetall(IDLE)
    future = grid.submit(gf.add(2, 2))
    wait_until(lambda: client.llen("pg:{rt}:q:default"), "the call is queued")
    assert not future.done()
    start_worker()
    assert future.result(timeout=30) == 4


def test_a_call_handed_to_a_worker_that_died_is_run_by_another(grid, client, start_worker):
    dead = start_worker(heartbeat_ttl=3.0)  # outlives the kill long enough to mislead
    grid.wait_for_workers(1)
    assert grid.run(gf.add(1, 2), timeout=30) == 3
    wait_until(lambda: client.hgetall(IDLE), "the worker marks itself idle")
    handed = grid.stats().get("handed", 0)
    dead.kill()  # no goodbye: its mark and heartbeat stay until they go stale
    dead.wait()
    future = grid.submit(gf.add(3, 3))
    wait_until(lambda: grid.stats().get("handed", 0) > handed, "the call is handed to it")
    start_worker()  # its reaper finds the dead worker once the heartbeat lapses
    assert future.result(timeout=30) == 6
    assert grid.stats()["dead_workers"] == 1
