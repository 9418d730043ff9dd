"""Sharing a fan-out: a parent's queued children reach idle workers as events happen.

Workers run on threads of this process with a share period far longer than each
test, so only the events (a request parking with new children, a worker going idle)
can move work: the tick never fires.  Children hold their worker at a gate (a file)
the test opens once it has seen where they started, so nothing depends on timing.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

import gridfuncs as gf
import pygirder
from pygirder.grid.worker import Worker, WorkerOptions
from pygirder.grid.worker import loop as worker_loop
from pygirder.store.keys import Keys

NEVER = 600.0  # a share period no test lives to see


def poll(check: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout:.0f}s: {what}")


@pytest.fixture
def workers(valkey_server) -> Iterator[Callable[..., Worker]]:
    """Start in-process workers (``start(pool=...)``); all are stopped at the end."""
    started: list[tuple[Worker, threading.Thread]] = []
    namespace = f"share-{uuid.uuid4().hex[:10]}"

    def start(pool: str = "default") -> Worker:
        options = WorkerOptions(namespace=namespace, pool=pool, imports=("gridfuncs",),
                                share_period=NEVER, max_runtime=0)  # fmt: skip
        worker = Worker(valkey_server.url, options)
        thread = threading.Thread(target=lambda: asyncio.run(worker.run()), daemon=True)
        thread.start()
        started.append((worker, thread))
        return worker

    start.namespace = namespace  # type: ignore[attr-defined]
    yield start
    for worker, _ in started:
        if worker.loop is not None:
            worker.loop.call_soon_threadsafe(worker.stop)
    for _, thread in started:
        thread.join(30)


@pytest.fixture
def server(valkey_server) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(valkey_server.url)
    yield client
    client.close()


def idle_ids(server: redis.Redis, keys: Keys, pool: str = "default") -> set[str]:
    return {w.decode() for w in server.hkeys(keys.idle(pool))}


def started_on(gate: str) -> dict[int, str]:
    """Child -> the worker it started on, from the files the children leave."""
    out = {}
    for name in os.listdir(gate):
        if name.startswith("started-"):
            _, i, worker = name.split("-", 2)
            out[int(i)] = worker
    return out


def open_gate(gate: str) -> None:
    with open(os.path.join(gate, "open"), "w"):
        pass


def test_children_of_a_parent_that_parks_start_on_an_idle_peer_at_once(
    workers, server, valkey_server, tmp_path
):
    keys = Keys(workers.namespace)
    pair = {workers().id, workers().id}
    poll(lambda: idle_ids(server, keys) == pair, "both workers idle")
    gate = str(tmp_path)
    with pygirder.connect(valkey_server.url, workers=0, namespace=workers.namespace) as grid:
        future = grid.submit(gf.fan_held(8, gate))
        # the parent's worker holds one child at the gate; without an offer made when
        # the parent parked, the rest would wait for the share period
        where = poll(lambda: set(started_on(gate).values()) == pair and started_on(gate),
                     "children started on both workers")  # fmt: skip
        open_gate(gate)
        ran = future.result(timeout=30)
    assert set(ran) == pair
    assert set(where.values()) == pair


def test_a_worker_going_idle_wakes_the_peer_whose_offer_found_nobody_idle(
    workers, server, valkey_server, tmp_path
):
    keys = Keys(workers.namespace)
    pair = {workers().id, workers().id}
    poll(lambda: idle_ids(server, keys) == pair, "both workers idle")
    first, children = tmp_path / "first", tmp_path / "children"
    first.mkdir()
    children.mkdir()
    with pygirder.connect(valkey_server.url, workers=0, namespace=workers.namespace) as grid:
        blocker = grid.submit(gf.held(99, str(first)))
        busy = poll(lambda: started_on(str(first)).get(99), "the first call started")
        parent = grid.submit(gf.fan_held(8, str(children)))  # only the other one is idle
        (holder,) = pair - {busy}
        poll(lambda: started_on(str(children)).get(0) == holder, "a child started")
        # the parent's worker offered the other children while nobody was idle, and
        # its period is far away: only the idle worker's message can bring them over
        poll(lambda: server.zscore(keys.offers("default"), holder) is not None,
             "the offer that found nobody idle is recorded")  # fmt: skip
        open_gate(str(first))
        assert blocker.result(timeout=30) == busy
        where = poll(lambda: busy in started_on(str(children)).values() and started_on(
            str(children)), "a child started on the worker that went idle")  # fmt: skip
        open_gate(str(children))
        assert set(parent.result(timeout=30)) == pair
    assert holder in where.values()


def test_a_worker_back_from_a_resumed_request_is_idle_again_at_once(
    workers, server, valkey_server, tmp_path, monkeypatch
):
    # The blocking take outlives the test: a worker that left its idle mark off while
    # that take is still out would stay invisible to its peers until the take returns.
    monkeypatch.setattr(worker_loop, "TAKE_BLOCK_S", NEVER)
    keys = Keys(workers.namespace)
    parent_side = workers().id
    other = workers(pool="other").id
    poll(lambda: idle_ids(server, keys) == {parent_side}, "the worker idle")
    poll(lambda: idle_ids(server, keys, "other") == {other}, "the other pool's worker idle")
    gate = str(tmp_path)
    with pygirder.connect(valkey_server.url, workers=0, namespace=workers.namespace) as grid:
        future = grid.submit(gf.fan_held(1, gate, "other"))
        poll(lambda: started_on(gate), "the child started in the other pool")
        # the parent parked: its worker waits on the pool queue, marked idle (the mark
        # is the time it went idle)
        mark = poll(lambda: server.hget(keys.idle("default"), parent_side),
                    "idle while the parent waits")  # fmt: skip
        open_gate(gate)
        assert future.result(timeout=30) == [other]
        # the parent resumed (the mark went) and finished; the worker waits again
        poll(lambda: server.hget(keys.idle("default"), parent_side) not in (None, mark),
             "idle again after the parent")  # fmt: skip


def test_a_result_on_its_way_or_an_entry_out_on_offer_is_no_stray(
    workers, server, valkey_server, tmp_path
):
    # The check for strays (in-flight entries a lost take reply left behind) runs while
    # the worker computes; what it finished but has not stored yet, and what it has out
    # on offer, are still its own: handed back, they would run a second time.
    keys = Keys(workers.namespace)
    worker = workers()
    poll(lambda: idle_ids(server, keys) == {worker.id}, "the worker idle")
    release = threading.Event()
    store = worker.results._complete

    async def held_back(batch: list, *, retries: int) -> None:
        while not release.is_set():
            await asyncio.sleep(0.01)
        await store(batch, retries=retries)

    worker.results._complete = held_back  # type: ignore[method-assign]
    gate = str(tmp_path)
    with pygirder.connect(valkey_server.url, workers=0, namespace=workers.namespace) as grid:
        first = grid.submit(gf.add(40, 2))
        second = grid.submit(gf.held(0, gate))
        poll(lambda: started_on(gate), "the second call running")
        assert first.call.id in worker.results.storing()
        worker.sharing.offering.add(b"an-id-out-on-offer")
        server.lpush(keys.inflight(worker.id), b"an-id-out-on-offer")
        assert worker.loop is not None
        asyncio.run_coroutine_threadsafe(
            worker.recovery.requeue_strays(worker._known), worker.loop
        ).result(10)
        assert server.hget(keys.stats, "requeued") is None
        flight = server.lrange(keys.inflight(worker.id), 0, -1)
        assert {first.call.id.encode(), b"an-id-out-on-offer"} <= set(flight)
        release.set()
        open_gate(gate)
        assert first.result(timeout=30) == 42
        assert second.result(timeout=30) == worker.id
    assert server.hget(keys.stats, "executed") == b"2"
