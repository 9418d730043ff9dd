"""``up`` on a running fleet converges it: grow, shrink with a drain, idempotent.

Against moto in server mode: ``StandInAgents`` announce what an agent would, and the
drain is confirmed by the agent's own :class:`~pygirder.cloud.instance.drain.DrainWatcher`
against a real Valkey (the grid's Redis stands in for the redis node's).
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import redis
from fleet_helpers import Capacity, StandInAgents, fleet_instances, write_project

from pygirder.cloud.account import account_resources, setup
from pygirder.cloud.artifacts import build_artifact, push_artifact
from pygirder.cloud.fleet.converge import Target, converge, read_target, role_sizes
from pygirder.cloud.fleet.launch import UpOptions, up
from pygirder.cloud.fleet.naming import TAG_LAUNCH
from pygirder.cloud.fleet.teardown import down
from pygirder.cloud.instance.drain import DrainWatcher
from pygirder.cloud.tags import TAG_ROLE, from_tag_list
from pygirder.errors import ConfigError

TYPES = ("c7a.large", "m7a.large", "m6i.large")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("converge-artifact")
    return build_artifact(write_project(root), root / "out")


@pytest.fixture
def fleet(make_aws, config, built, boto) -> Any:
    """A running fleet of 2 workers (stand-in agents announce), removed afterwards."""
    aws_, _, _ = make_aws(config)
    setup(config, aws=aws_)
    res = account_resources(config, aws=aws_)
    push_artifact(built, res["bucket"], res["artifact_prefix"])
    image = boto("ec2").describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    agents = StandInAgents(boto("ec2"), res["topic_arn"])
    agents.start()
    summary = up(
        config,
        UpOptions(workers=2, instance_types=TYPES, image_id=image, deadline_s=20,
                  backoff_s=(0.2, 1.0), processes="1"),
        aws=aws_,
    )  # fmt: skip
    yield {"config": config, "aws": aws_, "fleet": summary.fleet, "res": res}
    agents.stop()
    down(config, summary.fleet, aws=aws_)


def _workers(boto, fleet: str) -> list[dict[str, Any]]:
    return [
        i for i in fleet_instances(boto, fleet)
        if from_tag_list(i.get("Tags")).get(TAG_ROLE) == "worker"
    ]  # fmt: skip


class DrainAgents:
    """The drain side of each worker's agent: a DrainWatcher that confirms at once."""

    def __init__(self, url: str, fleet: str, ids: list[str]) -> None:
        self.watchers = []
        for iid in ids:
            watcher = DrainWatcher(url, fleet, iid, lambda reason: None, interval_s=0.1)
            watcher.on_drain = lambda reason, w=watcher: w.confirm()
            watcher.start()
            self.watchers.append(watcher)

    def stop(self) -> None:
        for w in self.watchers:
            w.cancel()


def _connect(url: str):
    @contextlib.contextmanager
    def opened():
        client = redis.Redis.from_url(url)
        try:
            yield client
        finally:
            client.close()

    return opened


def test_converge_grows_shrinks_with_a_drain_and_is_idempotent(fleet, boto, redis_url) -> None:
    config, aws_, fid = fleet["config"], fleet["aws"], fleet["fleet"]
    first = {i["InstanceId"] for i in _workers(boto, fid)}
    capacity = Capacity(aws_.client("ec2"))
    target = Target(workers=4, instance_types=TYPES)
    grown = converge(config, fid, target, aws=aws_, connect=_connect(redis_url), deadline_s=20)
    assert len(grown.launched["worker"]) == 2 and not grown.problems
    assert len(_workers(boto, fid)) == 4
    assert read_target(aws_, "t", fid).workers == 4
    sizes = {s.role: (s.target, s.live) for s in grown.sizes}
    assert sizes == {"redis": (1, 1), "worker": (4, 4)}
    # The new workers boot from the fleet's own worker template (its tags say so).
    assert {from_tag_list(i["Tags"])[TAG_LAUNCH] for i in _workers(boto, fid)} == {f"{fid}-worker"}

    asked = len(capacity.requests)
    again = converge(config, fid, Target(workers=4, instance_types=TYPES), aws=aws_,
                     connect=_connect(redis_url), deadline_s=20)  # fmt: skip
    assert not again.changed and len(capacity.requests) == asked  # nothing launched
    assert len(_workers(boto, fid)) == 4

    before = _workers(boto, fid)
    agents = DrainAgents(redis_url, fid, [i["InstanceId"] for i in before])
    try:
        shrunk = converge(config, fid, Target(workers=1, instance_types=TYPES), aws=aws_,
                          connect=_connect(redis_url), deadline_s=20)  # fmt: skip
    finally:
        agents.stop()
    assert sorted(shrunk.drained.values()) == ["drained"] * 3
    left = _workers(boto, fid)
    assert len(left) == 1 and left[0]["InstanceId"] in first  # the newest went first
    assert {s.role: (s.target, s.live) for s in role_sizes(aws_, "t", fid)}["worker"] == (1, 1)
    with redis.Redis.from_url(redis_url) as client:  # drain records are cleaned up
        assert not client.keys("pygirder:fleet:*")


def test_a_drain_that_is_never_confirmed_ends_at_its_deadline(
    fleet, boto, redis_url, monkeypatch
) -> None:
    monkeypatch.setenv("PYGIRDER_DRAIN_TIMEOUT_S", "1")
    config, aws_, fid = fleet["config"], fleet["aws"], fleet["fleet"]
    said: list[str] = []
    report = converge(config, fid, Target(workers=0, instance_types=TYPES), aws=aws_,
                      connect=_connect(redis_url), say=said.append)  # fmt: skip
    assert sorted(report.drained.values()) == ["drain timed out"] * 2
    assert _workers(boto, fid) == []
    assert any("did not confirm the drain within 1s" in line for line in said)


def test_bad_targets_are_refused_before_anything_changes(fleet, boto) -> None:
    config, aws_, fid = fleet["config"], fleet["aws"], fleet["fleet"]
    for bad, message in (
        (Target(workers=3, min_workers=0, max_workers=2), "must lie between"),
        (Target(workers=1, min_workers=1), "give both"),
        (Target(workers=1, distributors=1), "launched without distributors"),
    ):
        with pytest.raises(ConfigError, match=message):
            converge(config, fid, bad, aws=aws_)
    assert len(_workers(boto, fid)) == 2
