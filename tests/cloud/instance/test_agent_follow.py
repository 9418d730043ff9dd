"""Following the grid to a replacement redis node: the address parameter, the follower,
and the supervisor's restart and hold.

Real Valkey servers (``EmbeddedServer``) stand in for the old and the new redis node;
the address parameter lives in moto's SSM (server mode).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from pygirder.cloud.errors import AgentError
from pygirder.cloud.instance.follow import (
    GridFollower,
    current_address,
    read_redis_address,
    redis_address_parameter,
)
from pygirder.cloud.instance.supervisor import Supervisor
from pygirder.server import EmbeddedServer

PASSWORD = "s3cret-of-the-fleet"


def _wait(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _url(server: EmbeddedServer) -> str:
    return f"redis://127.0.0.1:{server.port}/0"


def test_the_address_parameter_is_read_checked_and_optional(aws) -> None:
    import boto3

    ssm = boto3.client("ssm", region_name="us-east-1")
    fleet = "fl-20300101-0000-00112233aabbccdd"
    assert read_redis_address("t", fleet, region="us-east-1") is None  # never written
    assert current_address("t", fleet, "redis://10.0.0.5:6379/0", region="us-east-1") == (
        "redis://10.0.0.5:6379/0"
    )
    name = redis_address_parameter("t", fleet)
    ssm.put_parameter(Name=name, Value="redis://10.0.0.9:6379/0", Type="String")
    assert read_redis_address("t", fleet, region="us-east-1") == "redis://10.0.0.9:6379/0"
    assert current_address("t", fleet, "redis://10.0.0.5:6379/0", region="us-east-1") == (
        "redis://10.0.0.9:6379/0"
    )
    for bad in ("redis://:pw@10.0.0.9:6379/0", "redis://evil.example:6379/0", "10.0.0.9"):
        ssm.put_parameter(Name=name, Value=bad, Type="String", Overwrite=True)
        with pytest.raises(AgentError, match="is not a redis://ADDRESS:PORT/DB"):
            read_redis_address("t", fleet, region="us-east-1")
        # A starting worker keeps the user-data's address rather than a bad one.
        assert current_address("t", fleet, "redis://10.0.0.5:6379/0", region="us-east-1") == (
            "redis://10.0.0.5:6379/0"
        )


def test_the_follower_moves_only_when_the_grid_is_gone_and_the_new_node_answers() -> None:
    with EmbeddedServer(password=PASSWORD) as old, EmbeddedServer(password=PASSWORD) as new:
        known: list[str | None] = [_url(old)]
        moved: list[str] = []
        follower = GridFollower(_url(old), PASSWORD, lambda: known[0], moved.append,
                                interval_s=0.05, misses=2)  # fmt: skip
        # While the grid answers, the address is not even looked up.
        known[0] = _url(new)
        assert follower.check(0) == 0 and follower.check(1) == 0 and moved == []
        old.stop()
        # Gone, but nobody knows another node yet: the count of misses grows.
        known[0] = None
        assert follower.check(0) == 1 and follower.check(1) == 2 and moved == []
        # A known address that does not answer (yet) moves nothing either.
        follower._next_lookup = 0.0
        known[0] = "redis://127.0.0.1:9/0"
        assert follower.check(5) == 6 and moved == []
        # Lookups back off while the grid stays gone (SSM is not asked at every check).
        asked = follower.lookups
        for _ in range(5):
            follower.check(9)
        assert follower.lookups == asked
        follower._next_lookup = 0.0
        known[0] = _url(new)
        with EmbeddedServer(password=PASSWORD) as back:  # a grid that answers again
            blip = GridFollower(_url(back), PASSWORD, lambda: None, moved.append)
            blip._lookup_wait = 40.0
            assert blip.check(3) == 0 and blip._lookup_wait == blip.interval_s
        follower.start()
        try:
            _wait(lambda: moved == [_url(new)], what="the move")
            assert follower.url == _url(new) and follower.moves == 1
            time.sleep(0.3)  # the new grid answers: no further move
            assert moved == [_url(new)]
        finally:
            follower.cancel()


def test_a_wrong_password_is_not_a_grid_that_answers() -> None:
    with EmbeddedServer(password=PASSWORD) as server:
        follower = GridFollower(_url(server), "not-it", lambda: None, lambda url: None)
        assert not follower.reachable()
        assert GridFollower(_url(server), PASSWORD, lambda: None, lambda url: None).reachable()


CHILD = r"""
import os, signal, sys, time
from pathlib import Path
log = Path(sys.argv[1])
with log.open("a") as f:
    f.write(os.environ.get("PYGIRDER_REDIS", "-") + "\n")
if sys.argv[2] == "exit":
    sys.exit(1)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
while True:
    time.sleep(0.05)
"""


def _starts(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def test_a_restart_brings_the_service_up_against_the_new_address_without_counting(
    tmp_path: Path,
) -> None:
    log = tmp_path / "starts"
    supervisor = Supervisor(
        [sys.executable, "-c", CHILD, str(log), "serve"], env={"PYGIRDER_REDIS": "old"},
        max_restarts=0, stop_timeout_s=5,
    )  # fmt: skip
    runner = threading.Thread(target=supervisor.run)
    runner.start()
    try:
        _wait(lambda: _starts(log) == ["old"], what="the first start")
        for n in range(3):  # more restarts than max_restarts allows failures
            supervisor.restart("the grid moved", {"PYGIRDER_REDIS": f"new{n}"})
            _wait(lambda n=n: _starts(log)[-1:] == [f"new{n}"], what=f"restart {n}")
        assert runner.is_alive()
    finally:
        supervisor.stop("test over")
        runner.join(20)
    assert not runner.is_alive() and _starts(log) == ["old", "new0", "new1", "new2"]


def test_restarts_are_held_while_the_grid_is_gone_and_never_give_up(tmp_path: Path) -> None:
    log = tmp_path / "starts"
    grid_up = threading.Event()
    held: list[float] = []

    def hold(stopping: threading.Event) -> bool:
        if grid_up.is_set():
            return False
        held.append(time.monotonic())
        while not grid_up.is_set() and not stopping.is_set():
            stopping.wait(0.05)
        return True

    # The service exits at once each time, as a worker without a grid does; with a
    # hold, failures while the grid was gone are not the service's.
    supervisor = Supervisor(
        [sys.executable, "-c", CHILD, str(log), "exit"], max_restarts=1,
        backoff_base_s=0.01, hold=hold,
    )  # fmt: skip
    failed: list[BaseException] = []

    def run() -> None:
        try:
            supervisor.run()
        except AgentError as exc:
            failed.append(exc)

    runner = threading.Thread(target=run)
    runner.start()
    try:
        _wait(lambda: len(_starts(log)) == 1 and held, what="the held restart")
        time.sleep(0.5)  # far longer than the backoff: still held, not given up
        assert len(_starts(log)) == 1 and runner.is_alive() and not failed
        grid_up.set()  # the grid is back: the held restart runs, then failures count
        runner.join(20)
        assert failed and "failed 2 times in a row" in str(failed[0])
        assert len(_starts(log)) == 3
    finally:
        supervisor.stop("test over")
        runner.join(20)
