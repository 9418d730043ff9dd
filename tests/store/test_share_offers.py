"""An offer nobody could take is recorded, and the next worker to go idle wakes its
maker: the scripts behind event-driven sharing, run directly on the server."""

from __future__ import annotations

import uuid

from pygirder.store import scripts
from pygirder.store.keys import Keys


def local_requests(client, keys: Keys, worker: str, n: int) -> list[str]:
    ids = [uuid.uuid4().hex for _ in range(n)]
    for request_id in ids:
        client.hset(keys.state(request_id),
                    mapping={"p": b"x", "s": "local", "o": worker, "pool": "default"})  # fmt: skip
    client.sadd(keys.owned(worker), *ids)
    return ids


def test_an_offer_with_nobody_idle_is_recorded_and_the_next_idle_worker_wakes_it(client):
    keys = Keys(f"t-{uuid.uuid4().hex[:8]}")
    conn = scripts.SyncRunner(client)
    early, late = local_requests(client, keys, "early", 2), local_requests(client, keys, "late", 3)
    assert scripts.share(conn, keys, early, pool="default", worker="early") == []
    assert scripts.share(conn, keys, late, pool="default", worker="late") == []
    assert client.zrange(keys.offers("default"), 0, -1) == [b"early", b"late"]
    assert client.llen(keys.queue("default")) == 0  # nothing moved while nobody was idle

    # the latest offerer is woken (its stack is likeliest to hold surplus still), once
    # a take that claims nothing marks its worker idle and wakes the latest offerer
    assert scripts.take(conn, keys, pool="default", worker="hungry", max=4, waits=True) == []
    assert client.lrange(keys.inbox("late"), 0, -1) == [scripts.SHARE_NOW]
    assert client.ttl(keys.inbox("late")) > 0  # a dead offerer's inbox goes away
    assert client.hkeys(keys.idle("default")) == [b"hungry"]
    assert client.hget(keys.idle("default"), "hungry").startswith(b"h")  # takes hand-offs
    assert client.zrange(keys.offers("default"), 0, -1) == [b"early"]
    # woken, it offers again: the idle worker is there now, so the offer moves
    moved = scripts.share(conn, keys, late[:2], pool="default", worker="late")
    assert moved == [late[0].encode(), late[1].encode()]
    assert client.zrange(keys.offers("default"), 0, -1) == [b"early"]


def test_a_worker_going_idle_drops_its_own_offer_and_wakes_nobody_without_offers(client):
    keys = Keys(f"t-{uuid.uuid4().hex[:8]}")
    conn = scripts.SyncRunner(client)
    scripts.share(conn, keys, local_requests(client, keys, "w", 2), pool="default", worker="w")
    assert scripts.take(conn, keys, pool="default", worker="w", max=4, waits=True) == []
    assert client.zcard(keys.offers("default")) == 0
    assert client.llen(keys.inbox("w")) == 0
    assert client.hexists(keys.idle("default"), "w")
    # an offer of nothing records nothing, and a forced one never waits for anybody
    assert scripts.share(conn, keys, [], pool="default", worker="x") == []
    forced = local_requests(client, keys, "y", 2)
    client.hdel(keys.idle("default"), "w")
    assert len(scripts.share(conn, keys, forced, pool="default", worker="y", force=True)) == 2
    assert client.zcard(keys.offers("default")) == 0


def test_requests_a_worker_took_and_has_not_started_can_be_offered_back(client):
    # a worker that took a batch from the queue holds it on its stack: when a peer runs
    # dry first, the batch's tail goes back to the queue, not only its own sub-calls
    keys = Keys(f"t-{uuid.uuid4().hex[:8]}")
    conn = scripts.SyncRunner(client)
    taken = [uuid.uuid4().hex for _ in range(3)]
    for request_id in taken:
        client.hset(keys.state(request_id), mapping={"p": b"x", "s": "queued", "pool": "default"})
        client.lpush(keys.queue("default"), request_id)
    reply = scripts.take(conn, keys, pool="default", worker="busy", max=16)
    assert reply[::3] == [i.encode() for i in taken]
    other = uuid.uuid4().hex  # running elsewhere: never moved by this worker's offer
    client.hset(keys.state(other), mapping={"p": b"x", "s": "running", "o": "peer"})
    client.hset(keys.idle("default"), "hungry", "1.0")
    moved = scripts.share(conn, keys, [taken[2], taken[1], other], pool="default", worker="busy")
    assert moved == [taken[2].encode(), taken[1].encode()]
    assert client.lrange(keys.inflight("busy"), 0, -1) == [taken[0].encode()]
    assert client.hget(keys.state(taken[1]), "s") == b"queued"
    assert client.hget(keys.state(taken[1]), "n") == b"0"  # the take is undone
    assert not client.hexists(keys.state(taken[1]), "o")
    assert client.hget(keys.state(other), "o") == b"peer"
    back = scripts.take(conn, keys, pool="default", worker="hungry", max=16)
    assert sorted(back[::3]) == sorted([taken[1].encode(), taken[2].encode()])


def test_a_completion_that_leaves_its_worker_idle_wakes_the_latest_offerer(client):
    keys = Keys(f"t-{uuid.uuid4().hex[:8]}")
    conn = scripts.SyncRunner(client)
    scripts.share(conn, keys, local_requests(client, keys, "busy", 2), pool="default",
                  worker="busy")  # fmt: skip
    done = uuid.uuid4().hex
    client.hset(keys.state(done), mapping={"p": b"x", "s": "running", "o": "dry"})
    client.hset(keys.call(done), "state", "taken")
    finished = scripts.Completion(done, b"O\x01", 0, 1.0, "1")
    # a completion that does not leave its worker idle wakes nobody
    assert scripts.complete(conn, keys, [finished], worker="dry") == 1
    assert client.llen(keys.inbox("busy")) == 0
    assert scripts.complete(conn, keys, [], worker="dry", idle_pool="default") == 0
    assert client.lrange(keys.inbox("busy"), 0, -1) == [scripts.SHARE_NOW]
    assert client.zcard(keys.offers("default")) == 0
    assert client.hget(keys.idle("default"), "dry").startswith(b"h")
