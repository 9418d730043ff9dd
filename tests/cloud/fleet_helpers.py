"""Helpers of the fleet tests: an artifact, spot capacity shaped by the test, and
instances that announce themselves without booting anything.

``Capacity`` reshapes real CreateFleet calls to the moto server through botocore's
``before-parameter-build``/``before-call``/``after-call`` events (the hooks botocore's
own Stubber uses): pools the test declares empty are taken out of the request and
reported in the response's ``Errors`` list, as EC2 reports them; a "short" answer asks
moto for fewer instances than requested and reports the rest as missing capacity.
Every instance that is launched is really launched by moto.

``StandInAgents`` publishes the announcements an instance's agent would publish (with
the agent's own ``publish_announcement``, through SNS to the status queue), for tests
of the launch logic that do not need a process per instance.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import redis

from pygirder.cloud.fleet.naming import TAG_LAUNCH
from pygirder.cloud.instance.announce import Announcement, publish_announcement
from pygirder.cloud.instance.drain import DrainWatcher
from pygirder.cloud.instance.metadata import InstanceMetadata
from pygirder.cloud.tags import TAG_FLEET, TAG_ROLE, from_tag_list

JOBS = '''\
"""Grid functions of the fleet tests: a re-entrant sum over a tree."""

import time

import pygirder


@pygirder.fn
def tree_sum(depth: int, k: int = 0, leaf_s: float = 0.0) -> int:
    """Sum of the leaf numbers below node k: every level waits on four sub-calls."""
    if depth == 0:
        time.sleep(leaf_s)
        return k
    parts = pygirder.wait(*(tree_sum(depth - 1, 4 * k + i, leaf_s) for i in range(4)))
    return sum(parts)
'''


def write_project(root: Path) -> Path:
    project = root / "fleetjobs"
    project.mkdir(parents=True, exist_ok=True)
    (project / "fleetjobs.py").write_text(JOBS)
    return project


def data_plane_account(tmp_path: Path, extra_toml: str = "") -> tuple[Any, Any, dict[str, Any]]:
    """An account set up on moto for a fleet on the local data plane, with the
    ``fleetjobs`` project's artifact pushed: (config, Aws, account resources)."""
    from cloud_helpers import PUBLIC_KEY, SSH_FROM

    from pygirder.cloud.account import account_resources, setup
    from pygirder.cloud.artifacts import build_artifact, push_artifact
    from pygirder.cloud.aws import Aws
    from pygirder.cloud.config import load_config
    from pygirder.cloud.sim.simulator import loopback_network

    (tmp_path / "id_ed25519.pub").write_text(PUBLIC_KEY + "\n")
    toml = tmp_path / "pygirder.toml"
    network = "".join(f'{key} = "{value}"\n' for key, value in loopback_network().items())
    toml.write_text(
        f'[cloud]\nname = "t"\nssh_from = "{SSH_FROM}"\npublic_key_file = "id_ed25519.pub"\n'
        'cluster_key_file = "keys/cluster.pem"\n' + extra_toml + network
    )
    config = load_config(toml)
    aws_ = Aws(config)
    setup(config, aws=aws_)
    res = account_resources(config, aws=aws_)
    project = write_project(tmp_path)
    push_artifact(build_artifact(project, tmp_path / "out"), res["bucket"], res["artifact_prefix"])
    return config, aws_, res


class Capacity:
    """Spot capacity of the moto server as a test wants it (see the module docstring)."""

    def __init__(self, ec2: Any, *, empty_types: set[str] = frozenset(), short: int = 0):
        self.empty_types = set(empty_types)
        self.short = short
        self.requests: list[dict[str, Any]] = []
        events = ec2.meta.events  # a client copies its session's hooks when it is made
        events.register("before-parameter-build.ec2.CreateFleet", self._shape)
        events.register("before-call.ec2.CreateFleet", self._short_circuit)
        events.register("after-call.ec2.CreateFleet", self._report)

    def _shape(self, params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        config = params["LaunchTemplateConfigs"][0]
        overrides = config["Overrides"]
        self.requests.append(
            {
                "pools": [(o["InstanceType"], o["SubnetId"]) for o in overrides],
                "capacity": params["TargetCapacitySpecification"]["TotalTargetCapacity"],
            }
        )
        empty = [o for o in overrides if o["InstanceType"] in self.empty_types]
        config["Overrides"] = [o for o in overrides if o not in empty]
        errors = [_error(config, o) for o in empty]
        wanted = params["TargetCapacitySpecification"]["TotalTargetCapacity"]
        if self.short and config["Overrides"] and wanted > 1:
            cut = min(self.short, wanted - 1)
            self.short = 0
            params["TargetCapacitySpecification"]["TotalTargetCapacity"] = wanted - cut
            errors.append(_error(config, config["Overrides"][0]))
        context["capacity_errors"] = errors
        context["capacity_none_left"] = not config["Overrides"]

    def _short_circuit(self, model: Any, context: dict[str, Any], **_: Any) -> Any:
        if not context.get("capacity_none_left"):
            return None
        from botocore.awsrequest import AWSResponse

        parsed = {
            "FleetId": "fleet-00000000-0000-0000-0000-000000000000",
            "Instances": [],
            "Errors": context["capacity_errors"],
            "ResponseMetadata": {"HTTPStatusCode": 200},
        }
        return AWSResponse("https://injected.invalid", 200, {}, None), parsed

    def _report(self, parsed: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        if not context.get("capacity_none_left"):
            parsed.setdefault("Errors", []).extend(context.get("capacity_errors", []))


def _error(config: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    return {
        "LaunchTemplateAndOverrides": {
            "LaunchTemplateSpecification": config["LaunchTemplateSpecification"],
            "Overrides": dict(override),
        },
        "Lifecycle": "spot",
        "ErrorCode": "InsufficientInstanceCapacity",
        "ErrorMessage": "There is no Spot capacity available that matches your request.",
    }


class StandInAgents(threading.Thread):
    """Announces ``up`` and ``ready`` for every running fleet instance, except for
    ``silent`` ones (a count per role): they never say anything, like a boot that hangs."""

    def __init__(self, ec2: Any, topic_arn: str, *, silent: dict[str, int] | None = None):
        super().__init__(name="stand-in-agents", daemon=True)
        self.ec2 = ec2
        self.topic_arn = topic_arn
        self.silent = dict(silent or {})
        self.announced: set[str] = set()
        self.ignored: set[str] = set()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.2):
            reservations = self.ec2.describe_instances(
                Filters=[
                    {"Name": "tag-key", "Values": [TAG_FLEET]},
                    {"Name": "instance-state-name", "Values": ["running"]},
                ]
            )["Reservations"]
            for inst in [i for r in reservations for i in r["Instances"]]:
                iid = inst["InstanceId"]
                if iid in self.announced or iid in self.ignored:
                    continue
                tags = from_tag_list(inst.get("Tags"))
                role = tags.get(TAG_ROLE, "")
                if TAG_LAUNCH not in tags:  # not launched by `up`
                    continue
                if self.silent.get(role, 0) > 0:
                    self.silent[role] -= 1
                    self.ignored.add(iid)
                    continue
                announce(self.topic_arn, inst)
                self.announced.add(iid)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def announce(topic_arn: str, inst: dict[str, Any], events: tuple[str, ...] = ("up", "ready")):
    """Publish what the agent of ``inst`` (a DescribeInstances entry) would."""
    tags = from_tag_list(inst.get("Tags"))
    meta = InstanceMetadata(
        instance_id=inst["InstanceId"],
        private_ip=inst["PrivateIpAddress"],
        public_hostname=None,
        zone=inst["Placement"]["AvailabilityZone"],
        region="us-east-1",
        instance_type=inst["InstanceType"],
        lifecycle="spot",
        ami_id=inst["ImageId"],
    )
    for event in events:
        publish_announcement(
            topic_arn,
            Announcement.make(
                event,
                launch_id=tags[TAG_LAUNCH],
                role=tags.get(TAG_ROLE, ""),
                meta=meta,
                fleet=tags[TAG_FLEET],
            ),
        )


def wait_until(check: Any, timeout: float = 30.0, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def fleet_instances(boto, fleet: str, states=("pending", "running")) -> list[dict]:
    filters = [{"Name": f"tag:{TAG_FLEET}", "Values": [fleet]}]
    if states:
        filters.append({"Name": "instance-state-name", "Values": list(states)})
    reservations = boto("ec2").describe_instances(Filters=filters)["Reservations"]
    return [i for r in reservations for i in r["Instances"]]


def leftovers(boto, fleet: str) -> dict[str, list]:
    """What of a fleet is left, asked without pygirder's code."""
    ec2, ssm = boto("ec2"), boto("ssm")
    f = [{"Name": f"tag:{TAG_FLEET}", "Values": [fleet]}]
    return {
        "instances": [
            i["InstanceId"]
            for i in fleet_instances(boto, fleet, states=None)
            if i["State"]["Name"] != "terminated"
        ],
        "fleets": [
            x["FleetId"]
            for x in ec2.describe_fleets(Filters=f)["Fleets"]
            if not x["FleetState"].startswith("deleted")
        ],
        "spot_requests": [
            r["SpotInstanceRequestId"]
            for r in ec2.describe_spot_instance_requests(Filters=f)["SpotInstanceRequests"]
            if r["State"] in ("open", "active")
        ],
        "volumes": [
            v["VolumeId"]
            for v in ec2.describe_volumes(Filters=f)["Volumes"]
            if v["State"] == "available"
        ],
        "templates": [
            t["LaunchTemplateId"]
            for t in ec2.describe_launch_templates(Filters=f)["LaunchTemplates"]
        ],
        "parameters": [
            p["Name"]
            for p in ssm.get_parameters_by_path(Path="/pygirder/t", Recursive=True)["Parameters"]
            if fleet in p["Name"]
        ],
        "roles": [
            r["RoleName"]
            for r in boto("iam").list_roles(PathPrefix="/pygirder/")["Roles"]
            if fleet.rsplit("-", 1)[-1] in r["RoleName"]
        ],
        "instance_profiles": [
            p["InstanceProfileName"]
            for p in boto("iam").list_instance_profiles(PathPrefix="/pygirder/")["InstanceProfiles"]
            if fleet.rsplit("-", 1)[-1] in p["InstanceProfileName"]
        ],
    }


def nat_state(boto) -> str:
    reservations = boto("ec2").describe_instances(
        Filters=[{"Name": "tag:pygirder:component", "Values": ["nat-instance"]}]
    )["Reservations"]
    return reservations[0]["Instances"][0]["State"]["Name"]


# ------------------------------------------------------------ elastic fleets

# Instance types of the elastic-fleet tests; moto launches whatever it is asked for.
TYPES = ("c7a.large", "m7a.large", "m6i.large")


def workers_of(boto, fleet: str) -> list[dict[str, Any]]:
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


def connect_to(url: str):
    @contextlib.contextmanager
    def opened():
        client = redis.Redis.from_url(url)
        try:
            yield client
        finally:
            client.close()

    return opened


def amazon_image(ec2: Any, architecture: str = "x86_64") -> str:
    """An Amazon Linux 2023 image of ``architecture`` that moto serves (workers boot
    x86_64, the redis node's default Graviton type arm64), asked for by name: listing
    Amazon's images (about 1300 in moto) takes one to three seconds a call."""
    got = ec2.describe_images(
        Owners=["amazon"],
        Filters=[
            {"Name": "architecture", "Values": [architecture]},
            {"Name": "name", "Values": [f"al2023-ami-2023*-{architecture}"]},
        ],
    )
    return sorted(i["ImageId"] for i in got["Images"])[0]
