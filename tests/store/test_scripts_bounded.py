"""Server scripts do bounded work per call: long lists are chunked, cancelled queue
entries are dropped lazily by the take, and cycle searches advance a step at a time.

The server runs one script at a time, so a long one stalls every client of the grid
(heartbeats included).  These tests check the behaviour that keeps them short; the
times themselves are measured by ``bench/scripts_latency.py``.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid

import pytest
import redis
from typer.testing import CliRunner

import gridfuncs as gf
from pygirder.cli.status import app
from pygirder.errors import GridCycleError
from pygirder.grid.cycles import CycleSearch
from pygirder.grid.worker import Parked, Worker, WorkerOptions
from pygirder.observe.status import FailureScanner, collect_status
from pygirder.store import scripts
from pygirder.store.keys import Keys


def wait_until(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def new_id() -> str:
    return uuid.uuid4().hex


# -- cancel ----------------------------------------------------------------------------
def test_cancel_of_many_calls_is_chunked_and_a_resubmit_runs_once(grid_factory, tmp_path):
    grid = grid_factory(workers=0)
    rt = grid.runtime
    log = str(tmp_path / "exec.log")
    calls = [gf.slow(i, 0.0, log) for i in range(2 * scripts.CANCEL_CHUNK + 100)]
    ids = [c.id for c in calls]
    grid._call(rt.submit(calls))
    client = redis.Redis.from_url(grid.url)
    keys = Keys(grid.namespace)
    try:
        assert client.llen(keys.queue("default")) == len(calls)
        before = rt.round_trips
        dropped = grid._call(rt.cancel(ids))
        assert sorted(dropped) == sorted(ids)
        assert rt.round_trips - before == math.ceil(len(ids) / scripts.CANCEL_CHUNK)
        # lazily: the entries stay until a take reaches them, and status says so
        status = collect_status(client, grid.namespace)
        assert status["totals"]["queued"] == len(calls)
        assert status["totals"]["stale"] == len(calls)
        assert status["stats"]["cancelled"] == len(calls)
        shown = CliRunner().invoke(
            app, ["status", "--redis", grid.url, "--namespace", grid.namespace, "--sample", "0"]
        )
        assert shown.exit_code == 0, shown.output
        assert f"{len(calls):,} of the queued are cancelled calls" in shown.output

        again = [grid.submit(c) for c in calls[:5]]  # a second queue entry each
        grid.add_workers(1)
        assert [f.result(timeout=30) for f in again] == [10 * i for i in range(5)]
        wait_until(lambda: client.llen(keys.queue("default")) == 0, what="an empty queue")
        wait_until(lambda: client.hget(keys.stats, "dropped") == str(len(calls)).encode(),
                   what="every stale entry dropped")  # fmt: skip
        assert gf.count(log) == {f"slow:{i}": 1 for i in range(5)}
        status = collect_status(client, grid.namespace)
        assert status["totals"]["stale"] == 0 and status["stats"]["executed"] == 5
    finally:
        client.close()


def test_cancel_script_refuses_more_ids_than_a_chunk(client):
    conn, keys = scripts.SyncRunner(client), Keys("t")
    ids = [new_id() for _ in range(scripts.CANCEL_CHUNK + 1)]
    with pytest.raises(redis.ResponseError, match="in chunks"):
        scripts.cancel(conn, keys, ids, process="p")
    assert scripts.cancel(conn, keys, ids[:-1], process="p") == []


# -- take ------------------------------------------------------------------------------
def test_take_claims_a_request_with_two_queue_entries_once(client):
    keys = Keys("t")
    conn = scripts.SyncRunner(client)
    twice, local, live = new_id(), new_id(), new_id()
    client.hset(keys.state(twice), mapping={"p": b"payload", "s": "queued", "pool": "default"})
    client.hset(keys.state(local), mapping={"p": b"x", "s": "local", "o": "w9", "pool": "default"})
    client.hset(keys.state(live), mapping={"p": b"live", "s": "queued", "pool": "default"})
    client.lpush(keys.queue("default"), twice, local, twice, live)  # RPOP order
    first = scripts.take(conn, keys, pool="default", worker="w1", max=16)
    assert first[0::3] == [twice.encode(), live.encode()]
    assert scripts.take(conn, keys, pool="default", worker="w2", max=16) == []
    assert client.llen(keys.queue("default")) == 0
    assert client.lrange(keys.inflight("w1"), 0, -1) == [live.encode(), twice.encode()]
    assert client.llen(keys.inflight("w2")) == 0
    assert client.hget(keys.state(local), "s") == b"local"  # left to its owner
    assert client.hget(keys.stats, "dropped") == b"2"


def test_take_drops_a_bounded_number_of_stale_entries_per_call(client):
    keys = Keys("t")
    conn = scripts.SyncRunner(client)
    stale = [new_id() for _ in range(3000)]
    live = new_id()
    client.hset(keys.state(live), mapping={"p": b"live", "s": "queued", "pool": "default"})
    client.lpush(keys.queue("default"), *stale)
    client.lpush(keys.queue("default"), live)  # behind every stale entry
    calls = 0
    while True:
        calls += 1
        before = client.llen(keys.queue("default"))
        got = scripts.take(conn, keys, pool="default", worker="w1", max=16)
        assert before - client.llen(keys.queue("default")) <= 4 * 16 + 256
        if got:
            break
        assert calls < 100
    assert got[0::3] == [live.encode()] and calls > 1
    assert client.llen(keys.inflight("w1")) == 1


# -- cycle search ----------------------------------------------------------------------
class StepRunner:
    """Runs the steps of a cycle search on a sync client, ``delay`` seconds late (a
    loaded server), and keeps their replies."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.delay = 0.0
        self.replies: list = []

    async def run_script(self, script, keys, args):
        assert script is scripts.REACH
        await asyncio.sleep(self.delay)
        reply = script.run_sync(self.client, keys, args)
        self.replies.append(reply)
        return reply


def fill_children(client: redis.Redis, keys: Keys, parent: str, kids: list[str]) -> None:
    pipe = client.pipeline(transaction=False)
    for start in range(0, len(kids), 5000):
        pipe.sadd(keys.children(parent), *kids[start : start + 5000])
    pipe.execute()


async def rounds_to_find(worker: Worker, request_id: str, parked: Parked, rounds: int) -> int:
    """Rounds of ``CycleChecks.check`` (as the worker's cycle loop runs them) until the
    cycle is found; the number of rounds."""
    for n in range(1, rounds + 1):
        await worker.cycles.check(request_id, parked)
        if parked.cycle.done():
            return n
    return rounds


def test_cycle_through_a_node_with_many_children_is_found_in_bounded_steps(redis_url, client):
    keys = Keys(f"t-{uuid.uuid4().hex[:8]}")
    request, child = new_id(), new_id()
    kids = [new_id() for _ in range(50_000)]
    back = kids[31_337]
    fill_children(client, keys, child, kids)
    pipe = client.pipeline(transaction=False)
    for kid in kids[2000:5000]:  # unfinished calls with children: expanded in turn
        pipe.sadd(keys.children(kid), new_id())
    pipe.execute()
    client.sadd(keys.children(back), request)  # back waits on the request: a cycle
    done = kids[:1000]  # finished children are not expanded
    client.mset({keys.result(k): b"r" for k in done})
    client.hset(keys.call(child), "fn", "mod:wide")

    async def main() -> tuple[int, GridCycleError]:
        worker = Worker(redis_url, WorkerOptions(namespace=keys.namespace))
        worker.cycles.step_budget, worker.cycles.steps, worker.cycles.step_target = 5000, 3, None
        await worker.runtime.start()
        try:
            loop = asyncio.get_running_loop()
            parked = Parked(children=[child], since=time.monotonic(),
                             cycle=loop.create_future(), next_check=0.0)  # fmt: skip
            rounds = await rounds_to_find(worker, request, parked, 50)
            assert parked.cycle.done(), "the cycle was not found"
            return rounds, parked.cycle.result()
        finally:
            await worker.runtime.close()

    rounds, err = asyncio.run(main())
    assert err.cycle == (request, child, back, request)
    assert f"mod:wide[{child[:12]}]" in str(err)
    assert rounds > 1  # the search was cut into several rounds of bounded steps


def test_cycle_search_without_a_cycle_ends_and_looks_at_bounded_steps(client):
    keys = Keys(f"t-{uuid.uuid4().hex[:8]}")
    request, child, grandchild = new_id(), new_id(), new_id()
    kids = [new_id() for _ in range(20_000)]
    fill_children(client, keys, child, [*kids, grandchild])
    client.mset({keys.result(k): b"r" for k in kids})  # finished: not expanded
    client.sadd(keys.children(grandchild), *kids[:10])  # a diamond, no way back
    conn = StepRunner(client)

    async def main() -> CycleSearch:
        search = CycleSearch(request, [child], step_budget=3000)
        for _ in range(100):
            assert await search.step(conn, keys) is None
            if search.done:
                return search
        raise AssertionError("the search did not end")

    search = asyncio.run(main())
    assert not search.gave_up and set(search.parent) == {child, grandchild}
    assert len(conn.replies) >= 20_000 // 3000
    # every step but the last was cut short inside the child's set
    assert all(cursor != b"0" for _, _, cursor, _ in conn.replies[:-2])


def test_cycle_search_gives_up_on_a_graph_larger_than_its_limit(client):
    keys = Keys(f"t-{uuid.uuid4().hex[:8]}")
    request, child = new_id(), new_id()
    kids = [new_id() for _ in range(5000)]
    fill_children(client, keys, child, kids)
    pipe = client.pipeline(transaction=False)
    for kid in kids:  # each with a child of its own: all to be expanded
        pipe.sadd(keys.children(kid), new_id())
    pipe.execute()
    conn = StepRunner(client)

    async def main() -> CycleSearch:
        search = CycleSearch(request, [child], step_budget=1000, max_nodes=2000)
        while not search.done:
            assert await search.step(conn, keys) is None
        return search

    assert asyncio.run(main()).gave_up


# -- recent failures -------------------------------------------------------------------
def test_failures_finished_at_the_same_time_follow_the_servers_order(client):
    keys = Keys(f"t-{uuid.uuid4().hex[:8]}")
    ids = [new_id() for _ in range(5)]
    for i, request_id in enumerate(ids):
        client.hset(keys.call(request_id), mapping={
            "fn": f"mod:f{i}", "state": "failed", "finished": "1000.5" if i else "999.0",
        })  # fmt: skip
    _, found = client.scan(0, match=keys.prefix + "call:*", count=1000)
    scan_order = [k.decode().rpartition("call:")[2] for k in found]
    oldest = ids[0]  # pushed out of the capped list: it comes last, by its time
    listed = [i for i in reversed(scan_order) if i != oldest]  # newest first
    client.rpush(keys.failures, *listed)
    failures = FailureScanner(client, keys.namespace).scan_all()
    assert [f["id"] for f in failures] == [*listed, oldest]


def test_cycle_search_step_budget_follows_the_time_a_step_takes(client):
    keys = Keys(f"t-{uuid.uuid4().hex[:8]}")
    request, child = new_id(), new_id()
    fill_children(client, keys, child, [new_id() for _ in range(20_000)])
    conn = StepRunner(client)

    async def main() -> list[int]:
        # a step over twice the target halves the budget; a local step (no delay) takes
        # far less than the target, however loaded the machine, and grows it
        search = CycleSearch(request, [child], step_budget=1600, target_s=0.2)
        budgets = []
        for slow in (True, True, False, False):
            conn.delay = 0.45 if slow else 0.0  # a loaded server
            await search.step(conn, keys)
            budgets.append(search.step_budget)
        return budgets

    assert asyncio.run(main()) == [800, 400, 500, 625]


# -- submit ----------------------------------------------------------------------------
def test_a_wait_on_many_calls_is_submitted_in_chunks_and_every_result_arrives(grid_factory):
    grid = grid_factory(workers=2)
    n = 3 * scripts.SUBMIT_CHUNK + 7
    calls = [gf.add(i, 1) for i in range(n)]
    before = grid.runtime.round_trips
    futures, _, _ = grid._call(grid.runtime.submit(calls))
    assert grid.runtime.round_trips - before == math.ceil(n / scripts.SUBMIT_CHUNK)
    assert grid.wait(calls, timeout=120) == [i + 1 for i in range(n)]
    assert all(f.done() for f in futures)
    # a grid function's wait goes through the worker's own (chunked) submit
    assert grid.wait([gf.wide(n)], timeout=120) == [sum(i + n for i in range(n))]


def test_a_failed_submit_chunk_fails_every_future_and_takes_back_earlier_chunks(grid_factory):
    grid = grid_factory(workers=0)
    rt = grid.runtime
    keys = Keys(grid.namespace)
    calls = [gf.add(i, 2) for i in range(2 * scripts.SUBMIT_CHUNK + 5)]
    real, sent = rt.run_script, []

    async def failing(script, keys, args):
        if script is scripts.SUBMIT:
            sent.append(script.name)
            if len(sent) == 2:
                raise redis.ConnectionError("lost the connection")
        return await real(script, keys, args)

    rt.run_script = failing
    try:
        with pytest.raises(redis.ConnectionError, match="lost the connection"):
            grid._call(rt.submit(calls))
    finally:
        rt.run_script = real
    assert len(sent) == 2  # the first chunk reached the grid, the second failed
    assert not any(c.id in rt._waiting or c.id in rt._resubmit for c in calls)
    client = redis.Redis.from_url(grid.url)
    try:
        # the first chunk is cancelled: nothing of it is left pending on the grid
        states = client.pipeline(transaction=False)
        for c in calls:
            states.exists(keys.state(c.id))
        assert sum(states.execute()) == 0
        assert int(client.hget(keys.stats, "cancelled") or 0) == scripts.SUBMIT_CHUNK
    finally:
        client.close()
    grid.add_workers(1)  # and the same calls submitted again run normally
    assert grid.wait(calls[:3], timeout=60) == [2, 3, 4]


# -- requeue and share -----------------------------------------------------------------
def owned_requests(client, keys: Keys, worker: str, n: int, state: str = "local") -> list[str]:
    ids = [new_id() for _ in range(n)]
    pipe = client.pipeline(transaction=False)
    for request_id in ids:
        pipe.hset(keys.state(request_id),
                  mapping={"p": b"x", "s": state, "o": worker, "pool": "default"})  # fmt: skip
    if state == "local":
        pipe.sadd(keys.owned(worker), *ids)
    else:
        pipe.lpush(keys.inflight(worker), *ids)
    pipe.execute()
    return ids


def test_requeue_without_ids_hands_back_a_bounded_page_per_call(client):
    keys = Keys(f"t-{uuid.uuid4().hex[:8]}")
    owned = owned_requests(client, keys, "w1", 2 * scripts.REQUEUE_PAGE + 10)
    conn = scripts.SyncRunner(client)
    calls = []
    while True:
        reply = scripts.requeue(conn, keys, worker="w1")
        calls.append(reply[:2])
        if not reply[1]:
            break
    assert [moved for moved, _ in calls] == [scripts.REQUEUE_PAGE, scripts.REQUEUE_PAGE, 10]
    assert [left for _, left in calls] == [scripts.REQUEUE_PAGE + 10, 10, 0]
    assert sorted(client.lrange(keys.queue("default"), 0, -1)) == sorted(i.encode() for i in owned)
    with pytest.raises(redis.ResponseError, match="in chunks"):
        scripts.requeue(conn, keys, owned[: scripts.REQUEUE_PAGE + 1], worker="w1")


def test_a_dead_worker_with_thousands_of_requests_has_each_requeued_once(redis_url, client):
    keys = Keys(f"t-{uuid.uuid4().hex[:8]}")
    dead = "dead-worker"
    owned = owned_requests(client, keys, dead, 4 * scripts.REQUEUE_PAGE + 3)
    running = owned_requests(client, keys, dead, scripts.REQUEUE_PAGE + 1, state="running")
    both = owned[7]  # on the stack and in flight at once: still requeued once
    client.lpush(keys.inflight(dead), both)
    # the request it was running carefully when it died, at its last attempt: poison
    poison = running[-1]
    client.hset(keys.state(poison), mapping={"d": 2, "strikes": 2})
    client.sadd(keys.owned(dead), poison)
    client.set(keys.current(dead), poison)
    client.hset(keys.workers, dead, '{"pool": "default"}')

    async def main() -> list[str]:
        worker = Worker(redis_url, WorkerOptions(namespace=keys.namespace))
        await worker.runtime.start()
        try:
            before = worker.runtime.round_trips
            reaped = await worker.recovery.reap_workers()
            pages = worker.runtime.round_trips - before
            assert pages >= (len(owned) + len(running)) // scripts.REQUEUE_PAGE
            return reaped
        finally:
            await worker.runtime.close()
            worker.threads.shutdown(wait=False)

    assert asyncio.run(main()) == [dead]
    queued = [i.decode() for i in client.lrange(keys.queue("default"), 0, -1)]
    expected = [*owned, *running[:-1]]
    assert len(queued) == len(expected) and set(queued) == set(expected)  # each once
    deaths = client.pipeline(transaction=False)
    for request_id in expected:
        deaths.hget(keys.state(request_id), "d")
    assert set(deaths.execute()) == {b"1"}
    assert int(client.hget(keys.stats, "requeued")) == len(expected)
    result = client.get(keys.result(poison))
    assert result is not None and b"PoisonRequest" in result  # failed, and only once
    assert int(client.hget(keys.stats, "executed")) == 1  # the poison error, stored once
    assert client.hget(keys.state(poison), "s") is None
    assert not client.exists(keys.owned(dead), keys.inflight(dead), keys.current(dead))
    assert not client.hexists(keys.workers, dead)


def test_a_forced_share_moves_the_whole_surplus_in_chunks(redis_url, client):
    keys = Keys(f"t-{uuid.uuid4().hex[:8]}")

    worker = Worker(redis_url, WorkerOptions(namespace=keys.namespace))
    ids = owned_requests(client, keys, worker.id, 3 * scripts.SHARE_CHUNK + 1)

    async def main() -> tuple[int, int]:
        await worker.runtime.start()
        try:
            worker.stack[:] = [(i, b"x", False) for i in ids]
            before = worker.runtime.round_trips
            moved = await worker.sharing.share(len(ids), force=True)
            return moved, worker.runtime.round_trips - before
        finally:
            await worker.runtime.close()
            worker.threads.shutdown(wait=False)

    assert asyncio.run(main()) == (len(ids), 4)  # everything, in 4 calls
    assert worker.stack == []
    assert sorted(client.lrange(keys.queue("default"), 0, -1)) == sorted(i.encode() for i in ids)
    assert client.scard(keys.owned(worker.id)) == 0
    assert {client.hget(keys.state(i), "s") for i in ids} == {b"queued"}


def test_a_worker_closed_right_after_a_share_closes_at_once(redis_url, client):
    """A cancel that reaches the inbox read at the wrong moment is swallowed by the
    client, which goes on waiting for the read's socket time-out (a minute): close
    must not wait for it."""

    async def main(worker: Worker, ids: list[str]) -> None:
        await worker.runtime.start()
        worker.stack[:] = [(i, b"x", False) for i in ids]
        assert await worker.sharing.share(len(ids), force=True) == len(ids)
        closing = asyncio.ensure_future(worker.runtime.close())
        done, _ = await asyncio.wait({closing}, timeout=10)
        worker.threads.shutdown(wait=False)
        assert done, "close() still waits for the inbox read"

    for _ in range(12):
        keys = Keys(f"t-{uuid.uuid4().hex[:8]}")
        worker = Worker(redis_url, WorkerOptions(namespace=keys.namespace))
        ids = owned_requests(client, keys, worker.id, scripts.SHARE_CHUNK + 1)
        asyncio.run(main(worker, ids))
