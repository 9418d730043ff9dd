"""Hand-offs: a new queued call goes straight to an idle worker, claimed for it by the
submit script, so the worker needs neither a blocking move nor a take to run it."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from pygirder.store import scripts
from pygirder.store.keys import Keys


@pytest.fixture
def keys() -> Keys:
    return Keys(f"handoff-{uuid.uuid4().hex[:8]}")


def new_id() -> str:
    return uuid.uuid4().hex + "00000000"  # 40 characters, as call ids are


def submit(client: redis.Redis, keys: Keys, payloads: list[bytes]) -> list[str]:
    ids = [new_id() for _ in payloads]
    calls = [
        scripts.Submission(i, p, "default", False, "m:f", "")
        for i, p in zip(ids, payloads, strict=True)
    ]
    scripts.submit(scripts.SyncRunner(client), keys, calls, process="client-1", graph_ttl=60)
    return ids


def idle_worker(client: redis.Redis, keys: Keys, worker: str, mark: str | None = None) -> None:
    client.hset(keys.idle("default"), worker, mark or f"h{time.time():.6f}")
    client.set(keys.heartbeat(worker), b"1", ex=10)


def test_a_new_call_is_claimed_for_an_idle_worker_and_pushed_to_its_inbox(client, keys):
    idle_worker(client, keys, "w1")
    [rid] = submit(client, keys, [b"payload"])
    state = client.hgetall(keys.state(rid))
    assert state[b"s"] == b"running" and state[b"o"] == b"w1" and state[b"p"] == b"payload"
    assert client.lrange(keys.inflight("w1"), 0, -1) == [rid.encode()]
    assert client.lrange(keys.inbox("w1"), 0, -1) == [b"2" + rid.encode() + b"payload"]
    assert client.ttl(keys.inbox("w1")) > 0
    assert not client.exists(keys.queue("default"))
    assert not client.hexists(keys.idle("default"), "w1")  # one call per idle worker
    assert client.hget(keys.call(rid), "state") == b"taken"
    assert client.hget(keys.call(rid), "worker") == b"w1"
    assert client.hget(keys.stats, "handed") == b"1"


def test_each_idle_worker_gets_one_call_and_the_rest_is_queued(client, keys):
    idle_worker(client, keys, "w1")
    idle_worker(client, keys, "w2")
    ids = submit(client, keys, [b"a", b"b", b"c", b"d"])
    owners = [client.hget(keys.state(i), "o") for i in ids]
    assert sorted(o for o in owners if o) == [b"w1", b"w2"]
    queued = [i.encode() for i, o in zip(ids, owners, strict=True) if o is None]
    assert sorted(client.lrange(keys.queue("default"), 0, -1)) == sorted(queued)
    assert not client.exists(keys.idle("default"))


@pytest.mark.parametrize(
    "why", ["distributor", "stale mark", "no heartbeat", "large payload", "junk mark"]
)
def test_a_call_is_queued_when_no_mark_can_take_it(client, keys, why):
    payload = b"p"
    if why == "distributor":  # stands in for its pool: it takes from the queue only
        client.hset(keys.idle("default"), "d1", str(time.time()))
    elif why == "stale mark":  # a worker that died idle stops getting calls quickly
        idle_worker(client, keys, "w1", f"h{time.time() - scripts.HANDOFF_FRESH_S - 1:.6f}")
    elif why == "no heartbeat":
        client.hset(keys.idle("default"), "w1", f"h{time.time():.6f}")
    elif why == "junk mark":
        idle_worker(client, keys, "w1", "hello")
    else:
        idle_worker(client, keys, "w1")
        payload = b"x" * (scripts.HANDOFF_LIMIT + 1)
    [rid] = submit(client, keys, [payload])
    assert client.hget(keys.state(rid), "s") == b"queued"
    assert client.lrange(keys.queue("default"), 0, -1) == [rid.encode()]
    assert not client.exists(keys.inflight("w1"), keys.inbox("w1"))


def test_a_take_that_claims_nothing_marks_a_waiting_worker_idle(client, keys):
    conn = scripts.SyncRunner(client)
    assert scripts.take(conn, keys, pool="default", worker="w1", max=4) == []
    assert not client.hexists(keys.idle("default"), "w1")  # not waiting: no mark
    assert scripts.take(conn, keys, pool="default", worker="w1", max=4, waits=True) == []
    mark = client.hget(keys.idle("default"), "w1")
    assert mark.startswith(b"h") and abs(float(mark[1:]) - time.time()) < 60
    [rid] = submit(client, keys, [b"p"])  # with a heartbeat it would be handed: queued
    reply = scripts.take(conn, keys, pool="default", worker="w1", max=4, waits=True)
    assert reply == [rid.encode(), b"p", b"0"]
    assert not client.hexists(keys.idle("default"), "w1")  # busy


def test_a_completion_can_mark_its_worker_idle(client, keys):
    idle_worker(client, keys, "w1")
    [rid] = submit(client, keys, [b"p"])
    done = [scripts.Completion(rid, b"Oresult", 0, time.time(), "ok")]
    conn = scripts.SyncRunner(client)
    assert scripts.complete(conn, keys, done, worker="w1", idle_pool="default") == 1
    assert client.hget(keys.idle("default"), "w1").startswith(b"h")
    assert not client.exists(keys.inflight("w1"), keys.state(rid))
    [again] = submit(client, keys, [b"q"])  # the next call is handed to it again
    assert client.hget(keys.state(again), "o") == b"w1"


def test_a_call_moved_off_its_queue_but_never_claimed_is_queued_again(client, keys):
    # a blocking move put it in the worker's in-flight list; the worker died (or
    # stopped) before its take claimed it
    [rid] = submit(client, keys, [b"p"])
    assert client.lmove(keys.queue("default"), keys.inflight("w1"), "RIGHT", "LEFT")
    conn = scripts.SyncRunner(client)
    assert scripts.requeue(conn, keys, worker="w1", dead=True, max_attempts=3)[:2] == [1, 0]
    assert client.lrange(keys.queue("default"), 0, -1) == [rid.encode()]
    assert client.hget(keys.state(rid), "s") == b"queued"
    assert not client.hexists(keys.state(rid), "d")  # it never ran: no death to count
    # the same by id, as a worker hands back an entry it does not know
    assert client.lmove(keys.queue("default"), keys.inflight("w2"), "RIGHT", "LEFT")
    assert scripts.requeue(conn, keys, [rid], worker="w2")[0] == 1
    assert client.lrange(keys.queue("default"), 0, -1) == [rid.encode()]
    assert not client.exists(keys.inflight("w2"))


def test_a_queued_call_in_a_workers_owned_set_only_is_not_queued_twice(client, keys):
    [rid] = submit(client, keys, [b"p"])
    client.sadd(keys.owned("w1"), rid)  # a stale entry: the call is in its queue already
    conn = scripts.SyncRunner(client)
    assert scripts.requeue(conn, keys, worker="w1", dead=True, max_attempts=3)[:2] == [0, 0]
    assert client.lrange(keys.queue("default"), 0, -1) == [rid.encode()]
