"""``agent run`` drains on request: SIGTERM to the service, ``going-away``, then drained.

The request comes through a real Valkey, as the fleet controller or ``up`` writes it;
a stand-in child plays the grid service (the worker's own hand-back on SIGTERM is
tested with the grid).
"""

from __future__ import annotations

import threading
import time

import redis
from test_agent_run import _options, child

from pygirder.cloud.instance.agent import run_service
from pygirder.cloud.instance.drain import drained, request_drain

FLEET = "fl-20260101-0000-0123456789abcdef"


def test_a_drain_request_stops_the_service_and_is_confirmed_after_it_exited(
    imds, status, tmp_path, redis_url
) -> None:
    state = tmp_path / "child"
    opts = _options(status, fleet=FLEET, redis=redis_url, drain_poll_s=0.1)
    outcome: list[int] = []
    thread = threading.Thread(
        target=lambda: outcome.append(
            run_service(opts, command=child(state), handle_signals=False)
        ),
        daemon=True,
    )
    thread.start()
    status.wait_for("ready")
    client = redis.Redis.from_url(redis_url)
    assert drained(client, FLEET) == {}  # not before it is asked
    other = "i-0000000000000000f"
    request_drain(client, FLEET, [other], "someone else")
    time.sleep(0.5)
    assert thread.is_alive() and not (state / "terminated").exists()
    request_drain(client, FLEET, [imds.instance_id], "fleet shrunk to 1 workers")
    thread.join(20)
    assert outcome == [0]
    assert (state / "terminated").read_text() == (state / "running").read_text()
    assert set(drained(client, FLEET)) == {imds.instance_id}
    going, _ = status.wait_for("going-away")
    assert going.detail == "drained: fleet shrunk to 1 workers"
    assert (state / "starts").read_text() == "1"
    client.close()
