"""``up``'s launch loop, ``down`` and ``sweep`` against moto in server mode.

No process runs per instance here: ``StandInAgents`` announces what an agent would,
through SNS and the status queue.  Spot capacity is shaped with botocore's event
hooks (``Capacity``).  What is left is checked with independent boto3 queries.
"""

from __future__ import annotations

import json
import logging
import re
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cloud_helpers import PUBLIC_KEY
from fleet_helpers import (
    Capacity,
    StandInAgents,
    amazon_image,
    announce,
    fleet_instances,
    leftovers,
    nat_state,
    wait_until,
    write_project,
)

from pygirder.cloud.account import account_resources, setup
from pygirder.cloud.artifacts import build_artifact, push_artifact
from pygirder.cloud.errors import FleetError, FleetNotReadyError
from pygirder.cloud.fleet.access import ssh_command, write_known_hosts
from pygirder.cloud.fleet.inventory import InstanceRow, fleet_cost, fleet_status
from pygirder.cloud.fleet.launch import Member, UpOptions, up
from pygirder.cloud.fleet.naming import TAG_LAUNCH, check_fleet_id, new_fleet_id
from pygirder.cloud.fleet.teardown import down, find_orphans, sweep
from pygirder.cloud.instance.announce import Announcement, publish_announcement
from pygirder.cloud.policy import allows_action, iam_action, operator_policy
from pygirder.cloud.tags import TAG_EXPIRES, TAG_FLEET, TAG_MANAGED, TAG_NAME, TAG_ROLE
from pygirder.errors import ConfigError

TYPES = ("c7a.large", "m7a.large", "m6i.large")


@pytest.fixture(scope="session")
def built_artifact(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fleet-artifact")
    return build_artifact(write_project(root), root / "out")


@pytest.fixture
def account(make_aws, config, built_artifact, boto) -> dict[str, Any]:
    """A set-up account with the artifact pushed: config, aws, faults, resources, image."""
    aws_, faults, _ = make_aws(config)
    setup(config, aws=aws_)
    res = account_resources(config, aws=aws_)
    push_artifact(built_artifact, res["bucket"], res["artifact_prefix"])
    image = amazon_image(boto("ec2"))
    arm = amazon_image(boto("ec2"), "arm64")  # the redis node's default type is Graviton
    return {"config": config, "aws": aws_, "faults": faults, "res": res, "image": image,
            "arm_image": arm}  # fmt: skip


@pytest.fixture
def agents(boto, account):
    started: list[StandInAgents] = []

    def start(**silent: int) -> StandInAgents:
        thread = StandInAgents(boto("ec2"), account["res"]["topic_arn"], silent=silent)
        thread.start()
        started.append(thread)
        return thread

    yield start
    for thread in started:
        thread.stop()


def options(account: dict[str, Any], **kw: Any) -> UpOptions:
    base = {
        "instance_types": TYPES,
        "image_id": account["image"],
        "image_ids": (account["arm_image"],),
        "deadline_s": 20,
        "backoff_s": (0.2, 1.0),
        "processes": "1",
    }
    return UpOptions(**{**base, **kw})


def test_capacity_errors_and_a_short_answer_are_made_up_from_other_pools(
    account, agents, boto
) -> None:
    capacity = Capacity(account["aws"].client("ec2"), empty_types={"c7a.large"}, short=1)
    agents()
    said: list[str] = []
    summary = up(
        account["config"], options(account, workers=3), aws=account["aws"], say=said.append
    )

    assert summary.ready("redis") == 1 and summary.ready("worker") == 3
    workers = [i for i in fleet_instances(boto, summary.fleet) if _tag(i, TAG_ROLE) == "worker"]
    assert len(workers) == 3
    assert all(i["InstanceType"] != "c7a.large" for i in workers)  # the empty pool
    assert all(i["SubnetId"] == account["res"]["private_subnet_id"] for i in workers)
    # The worker launch asked again for what was missing, without the pools that failed.
    worker_requests = capacity.requests[1:]
    assert len(worker_requests) >= 2
    first, second = worker_requests[0], worker_requests[1]
    assert first["capacity"] == 3 and second["capacity"] == 1
    failed = {p for p in first["pools"] if p[0] == "c7a.large"} | {first["pools"][1]}
    assert not failed & set(second["pools"])
    assert any("InsufficientInstanceCapacity" in line for line in said)
    # Launch templates say how instances must boot; the fleet tags say whose they are.
    templates = boto("ec2").describe_launch_templates(
        Filters=[{"Name": f"tag:{TAG_FLEET}", "Values": [summary.fleet]}]
    )["LaunchTemplates"]
    version = boto("ec2").describe_launch_template_versions(
        LaunchTemplateId=templates[0]["LaunchTemplateId"]
    )["LaunchTemplateVersions"][0]["LaunchTemplateData"]
    assert version["MetadataOptions"]["HttpTokens"] == "required"
    assert version["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert version["IamInstanceProfile"]["Arn"] == account["res"]["instance_profile_arn"]
    for inst in workers:
        assert _tag(inst, TAG_MANAGED) == "true" and _tag(inst, TAG_NAME) == "t"
        assert _tag(inst, TAG_EXPIRES).endswith("Z")
    param = boto("ssm").get_parameter(Name=f"/pygirder/t/{summary.fleet}/redis-password")
    assert param["Parameter"]["Type"] == "SecureString"
    assert nat_state(boto) == "running"  # private workers need it

    cost = fleet_cost(account["config"], aws=account["aws"])
    assert cost["roles"]["worker"]["instances"] == 3 and cost["nat"]["state"] == "running"
    report = down(account["config"], aws=account["aws"])
    assert report.clean, report
    assert not any(leftovers(boto, summary.fleet).values())
    assert nat_state(boto) in ("stopping", "stopped")
    # Every call up, cost and down made is allowed by `pygirder cloud policy`.
    used = {iam_action(*call.split(".")) for call in account["faults"].calls}
    assert {"ec2:CreateFleet", "ec2:DeleteLaunchTemplate", "ssm:PutParameter"} <= used
    assert [a for a in sorted(used) if not allows_action(operator_policy(), a)] == []


def test_an_instance_that_never_announces_is_terminated_at_the_deadline(
    account, agents, boto
) -> None:
    # A going-away message of a fleet that is long gone: nobody will ever read it.
    stale = {"kind": "pygirder.instance-event", "event": "going-away", "launch_id": "x",
             "role": "worker", "instance_id": "i-0", "private_ip": "10.0.0.1",
             "public_hostname": None, "zone": "us-east-1a", "instance_type": "t3.micro",
             "lifecycle": "spot", "pygirder_version": "0", "time": "2020-01-01T00:00:00Z",
             "fleet": "fl-20200101-0000-dead"}  # fmt: skip
    boto("sns").publish(TopicArn=account["res"]["topic_arn"], Message=json.dumps(stale))
    agents(worker=1)
    summary = up(
        account["config"], options(account, workers=3, min_workers=2, deadline_s=8),
        aws=account["aws"],
    )  # fmt: skip
    assert summary.ready("worker") == 2
    counts = boto("sqs").get_queue_attributes(
        QueueUrl=account["res"]["queue_url"],
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    assert set(counts.values()) == {"0"}  # ours read, the stale one dropped
    assert [m.detail for m in summary.removed] == ["not ready by the deadline (still launched)"]
    silent = summary.removed[0].instance_id
    states = {
        i["InstanceId"]: i["State"]["Name"] for i in fleet_instances(boto, summary.fleet, None)
    }
    assert states[silent] == "terminated"
    assert sum(1 for s in states.values() if s == "running") == 3
    status = fleet_status(account["config"], aws=account["aws"])
    assert sorted(r.role for r in status.rows) == ["redis", "worker", "worker"]
    down(account["config"], summary.fleet, aws=account["aws"])


def test_fewer_than_min_ready_fails_clearly_and_leaves_nothing(account, agents, boto) -> None:
    agents(worker=1)
    with pytest.raises(FleetNotReadyError) as info:
        up(
            account["config"], options(account, workers=2, min_workers=2, deadline_s=6),
            aws=account["aws"],
        )  # fmt: skip
    err = info.value
    assert err.ready == {"redis": 1, "worker": 1} and err.requested["worker"] == 2
    assert "1 of 2 worker ready (at least 2 needed)" in str(err)
    assert "nothing of it is left running" in str(err)
    assert not any(leftovers(boto, err.fleet).values())
    assert nat_state(boto) in ("stopping", "stopped")


def test_down_removes_only_what_is_tagged_and_sweep_finds_orphans(account, agents, boto) -> None:
    agents()
    config, aws_ = account["config"], account["aws"]
    summary = up(config, options(account, workers=1, public_workers=True), aws=aws_)
    ec2 = boto("ec2")
    zone = account["res"]["zone"]
    tags = [
        {"Key": TAG_MANAGED, "Value": "true"},
        {"Key": TAG_NAME, "Value": "t"},
        {"Key": TAG_FLEET, "Value": summary.fleet},
    ]
    ours = ec2.create_volume(
        AvailabilityZone=zone, Size=8,
        TagSpecifications=[{"ResourceType": "volume", "Tags": tags}],
    )["VolumeId"]  # fmt: skip
    theirs = ec2.create_volume(AvailabilityZone=zone, Size=8)["VolumeId"]
    assert nat_state(boto) in ("stopped", "stopping")  # public workers need no NAT

    report = down(config, aws=aws_)
    assert report.clean and ours in report.removed["volumes"]
    volumes = {v["VolumeId"]: v["State"] for v in ec2.describe_volumes()["Volumes"]}
    assert ours not in volumes and volumes[theirs] == "available"
    assert not any(leftovers(boto, summary.fleet).values())

    # Orphans of an older fleet of another setup: an instance whose time-to-live ran
    # out, and a launch template and a volume of a fleet with no instance left.
    old = (datetime.now(UTC) - timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    orphan_tags = [
        {"Key": TAG_MANAGED, "Value": "true"},
        {"Key": TAG_NAME, "Value": "other"},
        {"Key": TAG_FLEET, "Value": "fl-20200101-0000-abcd"},
        {"Key": TAG_EXPIRES, "Value": old},
    ]
    inst = ec2.run_instances(
        ImageId=account["image"], MinCount=1, MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": orphan_tags}],
    )["Instances"][0]["InstanceId"]  # fmt: skip
    template = ec2.create_launch_template(
        LaunchTemplateName="pygirder-other-old", LaunchTemplateData={"ImageId": account["image"]},
        TagSpecifications=[{"ResourceType": "launch-template", "Tags": orphan_tags}],
    )["LaunchTemplate"]["LaunchTemplateId"]  # fmt: skip
    young = ec2.create_volume(
        AvailabilityZone=zone, Size=8,
        TagSpecifications=[{"ResourceType": "volume", "Tags": orphan_tags[:3]}],
    )["VolumeId"]  # fmt: skip

    found = {o.id: o for o in find_orphans(config, 7200, aws=aws_)}
    assert set(found) == {inst, template}  # the volume is young and has no expiry
    assert "time-to-live ran out" in found[inst].reason
    dry = sweep(config, 7200, aws=aws_)
    assert dry.dry_run and not dry.deleted
    assert ec2.describe_launch_templates(LaunchTemplateIds=[template])["LaunchTemplates"]
    done = sweep(config, 0, yes=True, aws=aws_, wait_interval=0.1)
    assert set(done.deleted) == {inst, template, young} and not done.failures
    state = ec2.describe_instances(InstanceIds=[inst])["Reservations"][0]["Instances"][0]
    assert state["State"]["Name"] == "terminated"
    assert theirs in {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]}


def _tag(inst: dict, key: str) -> str:
    return next((t["Value"] for t in inst.get("Tags", []) if t["Key"] == key), "")


def test_ssh_goes_through_the_redis_node_to_private_instances(config) -> None:
    fleet = "fl-20260101-0000-0123456789abcdef"

    def row(iid: str, role: str, private: str, public: str = "") -> InstanceRow:
        return InstanceRow(iid, fleet, role, "running", "m7a.large",
                           "us-east-1a", private, private, public, None, None, "spot")  # fmt: skip

    jump = row("i-1", "redis", "10.42.0.5", "198.51.100.9")
    worker = row("i-2", "worker", "10.42.130.7")
    direct = ssh_command(config, jump, jump)
    assert direct[-1] == "ec2-user@198.51.100.9"
    cmd = ssh_command(config, worker, jump, ["tail", "-n", "5", "pygirder/boot.log"])
    assert "-J" not in cmd  # command-line options would not reach a -J jump host
    (proxy,) = [o.removeprefix("ProxyCommand=") for o in cmd if o.startswith("ProxyCommand=")]
    assert proxy.endswith("-W %h:%p ec2-user@198.51.100.9")
    assert cmd[-3:] == ["ec2-user@10.42.130.7", "--", "tail -n 5 pygirder/boot.log"]
    # Host keys are pinned per fleet, on both hops, never trusted on first use.
    known = f"UserKnownHostsFile={Path('~/.pygirder/known_hosts').expanduser() / fleet}"
    for line in (direct, cmd, proxy.split()):
        assert "StrictHostKeyChecking=yes" in line and known in line
        assert not any("accept-new" in part for part in line)
    with pytest.raises(FleetError, match="no public node to jump through"):
        ssh_command(config, worker, None)


def test_the_fleet_pins_the_host_keys_its_instances_announce(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    fleet = new_fleet_id()
    key = PUBLIC_KEY.split()[0] + " " + PUBLIC_KEY.split()[1]
    members = [
        Member("i-1", "redis", private_ip="10.42.0.5", public_ip="198.51.100.9", host_keys=(key,)),
        Member("i-2", "worker", private_ip="10.42.130.7", host_keys=(key,)),
        Member("i-3", "worker", private_ip="10.42.130.8"),  # announced none: not trusted
    ]
    path = write_known_hosts(fleet, members)
    assert path == tmp_path / ".pygirder" / "known_hosts" / fleet
    assert path.read_text().splitlines() == [
        f"198.51.100.9,10.42.0.5 {key}",
        f"10.42.130.7 {key}",
    ]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # What an announcement carries is checked before it can reach that file.
    body = json.dumps({**_announcement_fields(), "host_keys": [key, "evil\nline", "x y"]})
    assert Announcement.from_message(body).host_keys == (key,)


def _announcement_fields() -> dict[str, Any]:
    return {"kind": "pygirder.instance-event", "event": "ready", "launch_id": "x",
            "role": "worker", "instance_id": "i-0", "private_ip": "10.0.0.1",
            "public_hostname": None, "zone": "us-east-1a", "instance_type": "t3.micro",
            "lifecycle": "spot", "pygirder_version": "0",
            "time": "2020-01-01T00:00:00Z"}  # fmt: skip


def test_fleet_ids_carry_64_random_bits() -> None:
    ids = {new_fleet_id() for _ in range(200)}
    assert len(ids) == 200
    for fleet in ids:
        assert re.fullmatch(r"fl-\d{8}-\d{4}-[0-9a-f]{16}", fleet)
        assert check_fleet_id(fleet) == fleet
    assert check_fleet_id("fl-20200101-0000-abcd")  # fleets launched before
    with pytest.raises(ConfigError, match="16 hex digits"):
        check_fleet_id("fl-20200101-0000-abc")


# How long the forger waits for what ``up`` launches, and ``up`` for the announcements.
PATIENCE_S = 120.0


class Forger(threading.Thread):
    """An instance that may publish to the status topic and lies: it announces a
    fake redis node and asks for the termination of instances, then lets the real
    (stand-in) agents speak."""

    def __init__(self, ec2: Any, topic_arn: str, victim: str) -> None:
        super().__init__(name="forger", daemon=True)
        self.ec2, self.topic_arn, self.victim = ec2, topic_arn, victim
        self.forged: list[tuple[str, str]] = []
        self.error: BaseException | None = None
        self.done = threading.Event()

    def _ours(self, role: str) -> list[dict[str, Any]]:
        reservations = self.ec2.describe_instances(
            Filters=[
                {"Name": f"tag:{TAG_ROLE}", "Values": [role]},
                {"Name": "instance-state-name", "Values": ["running"]},
            ]
        )["Reservations"]
        return [
            i for r in reservations for i in r["Instances"]
            if _tag(i, TAG_LAUNCH) and i["InstanceId"] != self.victim
        ]  # fmt: skip

    def _forge(self, event: str, instance_id: str, real: dict[str, Any]) -> None:
        fields = {**_announcement_fields(), "event": event, "instance_id": instance_id,
                  "private_ip": "203.0.113.66", "launch_id": _tag(real, TAG_LAUNCH),
                  "role": _tag(real, TAG_ROLE), "fleet": _tag(real, TAG_FLEET),
                  "detail": "forged"}  # fmt: skip
        publish_announcement(self.topic_arn, Announcement(**fields))
        self.forged.append((event, instance_id))

    def run(self) -> None:
        try:
            redis = wait_until(lambda: self._ours("redis"), timeout=PATIENCE_S)[0]
            self._forge("ready", "i-0123456789abcdef0", redis)  # nobody's
            self._forge("ready", self.victim, redis)  # another fleet's
            real = redis["InstanceId"]
            self._forge("failed", real[:-1] + ("1" if real.endswith("0") else "0"), redis)
            announce(self.topic_arn, redis)
            workers = wait_until(lambda: self._ours("worker"), timeout=PATIENCE_S)
            self._forge("failed", self.victim, workers[0])
            self._forge("failed", "i-0fedcba9876543210", workers[0])
            announced: set[str] = set()

            def announce_new() -> bool:
                """Workers launched by a later request are announced as they appear."""
                for worker in self._ours("worker"):
                    if worker["InstanceId"] not in announced:
                        announce(self.topic_arn, worker)
                        announced.add(worker["InstanceId"])
                return len(announced) >= 2

            wait_until(announce_new, timeout=PATIENCE_S)
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()


def test_forged_announcements_are_ignored_and_logged(
    account, boto, caplog: pytest.LogCaptureFixture
) -> None:
    ec2 = boto("ec2")
    other_fleet = "fl-20200101-0000-0123456789abcdef"
    tags = [{"Key": TAG_MANAGED, "Value": "true"}, {"Key": TAG_NAME, "Value": "t"},
            {"Key": TAG_FLEET, "Value": other_fleet}, {"Key": TAG_ROLE, "Value": "redis"},
            {"Key": TAG_LAUNCH, "Value": f"{other_fleet}-redis"}]  # fmt: skip
    victim = ec2.run_instances(
        ImageId=account["image"], MinCount=1, MaxCount=1, InstanceType="t3.micro",
        SubnetId=account["res"]["public_subnet_id"],
        TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
    )["Instances"][0]["InstanceId"]  # fmt: skip
    forger = Forger(ec2, account["res"]["topic_arn"], victim)
    forger.start()
    caplog.set_level(logging.WARNING, logger="pygirder.fleet")
    # Budgets far beyond what the steps need, so a loaded machine only makes it slower.
    summary = up(
        account["config"], options(account, workers=2, deadline_s=PATIENCE_S), aws=account["aws"]
    )
    assert forger.done.wait(PATIENCE_S), "the forger did not finish"
    assert forger.error is None and len(forger.forged) == 5

    ids = {m.instance_id for m in summary.members}
    assert victim not in ids and "i-0123456789abcdef0" not in ids
    (node,) = [m for m in summary.members if m.role == "redis"]
    real = ec2.describe_instances(InstanceIds=[node.instance_id])["Reservations"][0]
    assert node.private_ip == real["Instances"][0]["PrivateIpAddress"] != "203.0.113.66"
    assert summary.ready("worker") == 2 and not summary.removed  # nothing terminated
    state = ec2.describe_instances(InstanceIds=[victim])["Reservations"][0]["Instances"][0]
    assert state["State"]["Name"] == "running"
    ignored = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    for event, instance_id in forger.forged:
        assert any(f"{event!r} announcement for {instance_id}" in line for line in ignored)
    assert down(account["config"], summary.fleet, aws=account["aws"]).clean
