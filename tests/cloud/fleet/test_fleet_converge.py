"""``up`` on a running fleet converges it: grow, shrink with a drain, idempotent.

Against moto in server mode: ``StandInAgents`` announce what an agent would, and the
drain is confirmed by the agent's own :class:`~pygirder.cloud.instance.drain.DrainWatcher`
against a real Valkey (the grid's Redis stands in for the redis node's).
"""

from __future__ import annotations

import time

import pytest
import redis
from fleet_helpers import TYPES, Capacity, connect_to, workers_of

from pygirder.cloud.fleet.converge import Target, converge, read_target, role_sizes
from pygirder.cloud.fleet.naming import TAG_LAUNCH
from pygirder.cloud.tags import from_tag_list
from pygirder.errors import ConfigError


def test_converge_grows_shrinks_with_a_drain_and_is_idempotent(
    fleet, boto, redis_url, drain_agents
) -> None:
    config, aws_, fid = fleet["config"], fleet["aws"], fleet["fleet"]
    first = {i["InstanceId"] for i in workers_of(boto, fid)}
    # EC2's LaunchTime has whole seconds: the grown workers must be newer than these for
    # the shrink below to tell them apart
    launched = max(i["LaunchTime"].timestamp() for i in workers_of(boto, fid))
    time.sleep(max(0.0, launched + 1.1 - time.time()))
    capacity = Capacity(aws_.client("ec2"))
    target = Target(workers=4, instance_types=TYPES)
    grown = converge(config, fid, target, aws=aws_, connect=connect_to(redis_url), deadline_s=20)
    assert len(grown.launched["worker"]) == 2 and not grown.problems
    assert len(workers_of(boto, fid)) == 4
    assert read_target(aws_, "t", fid).workers == 4
    sizes = {s.role: (s.target, s.live) for s in grown.sizes}
    assert sizes == {"redis": (1, 1), "worker": (4, 4)}
    # The new workers boot from the fleet's own worker template (its tags say so).
    assert {from_tag_list(i["Tags"])[TAG_LAUNCH] for i in workers_of(boto, fid)} == {
        f"{fid}-worker"
    }

    asked = len(capacity.requests)
    again = converge(config, fid, Target(workers=4, instance_types=TYPES), aws=aws_,
                     connect=connect_to(redis_url), deadline_s=20)  # fmt: skip
    assert not again.changed and len(capacity.requests) == asked  # nothing launched
    assert len(workers_of(boto, fid)) == 4

    before = workers_of(boto, fid)
    drain_agents(redis_url, fid, [i["InstanceId"] for i in before])
    shrunk = converge(config, fid, Target(workers=1, instance_types=TYPES), aws=aws_,
                      connect=connect_to(redis_url), deadline_s=20)  # fmt: skip
    assert sorted(shrunk.drained.values()) == ["drained"] * 3
    left = workers_of(boto, fid)
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
                      connect=connect_to(redis_url), say=said.append)  # fmt: skip
    assert sorted(report.drained.values()) == ["drain timed out"] * 2
    assert workers_of(boto, fid) == []
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
    assert len(workers_of(boto, fid)) == 2


def test_up_on_a_running_fleet_converges_it_and_fleet_shows_target_and_actual(
    fleet, boto, tmp_path
) -> None:
    import json

    from cloud_helpers import SSH_FROM
    from typer.testing import CliRunner

    from pygirder.cloud.cli import app

    toml = tmp_path / "pygirder.toml"
    toml.write_text(
        f'[cloud]\nname = "t"\nssh_from = "{SSH_FROM}"\npublic_key_file = "id_ed25519.pub"\n'
        'cluster_key_file = "keys/cluster.pem"\nalert_email = "ops@example.com"\n'
    )

    def cloud(*args: str) -> dict:
        result = CliRunner().invoke(app, [args[0], "--config", str(toml), *args[1:], "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    grown = cloud("up", "--workers", "3", "--instance-types", ",".join(TYPES),
                  "--deadline", "20s")  # fmt: skip
    assert grown["fleet"] == fleet["fleet"] and len(grown["launched"]["worker"]) == 1
    assert len(workers_of(boto, fleet["fleet"])) == 3
    again = cloud("up", "--workers", "3")
    assert not again["changed"]
    shown = cloud("fleet")
    assert {r["role"]: (r["target"], r["live"]) for r in shown["roles"]} == {
        "redis": (1, 1), "worker": (3, 3)}  # fmt: skip
    following = cloud("up", "--workers", "3", "--min-workers", "0", "--max-workers", "4")
    assert any("runs no controller" in p for p in following["problems"])
    bad = CliRunner().invoke(app, ["up", "--config", str(toml), "--min-workers", "1"])
    assert bad.exit_code != 0 and "give both --min-workers and --max-workers" in bad.output
