"""Completion messages: every waiting inbox gets one, except the completing worker's
own when it says it has resolved its waiters already (its nested calls' parents)."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from pygirder.store import scripts
from pygirder.store.keys import Keys


@pytest.fixture
def keys() -> Keys:
    return Keys(f"inboxes-{uuid.uuid4().hex[:8]}")


def local_call_waited_on_by_a_client(client: redis.Redis, keys: Keys) -> str:
    """A worker's nested call (on its own stack), which a client waits for too."""
    rid = uuid.uuid4().hex + "00000000"
    conn = scripts.SyncRunner(client)
    call = [scripts.Submission(rid, b"p", "default", True, "m:f", "")]
    assert scripts.submit(conn, keys, call, process="w1", owner="w1", parent="p1") == [1]
    queued = [scripts.Submission(rid, b"p", "default", False, "m:f", "")]
    assert scripts.submit(conn, keys, queued, process="client-1") == [0]
    return rid


@pytest.mark.parametrize("resolved_here", [True, False])
def test_the_completing_worker_gets_no_message_for_what_it_resolved(client, keys, resolved_here):
    rid = local_call_waited_on_by_a_client(client, keys)
    done = [scripts.Completion(rid, b"Oresult", 0, time.time(), "ok")]
    conn = scripts.SyncRunner(client)
    assert scripts.complete(conn, keys, done, worker="w1", resolved_here=resolved_here) == 1
    message = b"1" + rid.encode() + b"Oresult"
    assert client.lrange(keys.inbox("client-1"), 0, -1) == [message]  # always woken
    own = client.lrange(keys.inbox("w1"), 0, -1)
    assert own == ([] if resolved_here else [message])
    assert client.get(keys.result(rid)) == b"Oresult"
    assert not client.exists(keys.waiters(rid), keys.state(rid))
