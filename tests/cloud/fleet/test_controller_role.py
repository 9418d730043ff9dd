"""The controller's per-fleet instance role: made by ``up`` with the controller's policy
and the boundary, given to the redis node, removed by ``down``, found by ``sweep``."""

from __future__ import annotations

import fnmatch
from datetime import UTC, datetime, timedelta
from typing import Any

from fleet_helpers import TYPES, StandInAgents, amazon_image, leftovers

from pygirder.cloud.fleet.controller import controller_policy
from pygirder.cloud.fleet.controller_role import (
    CONTROLLER_POLICY_NAME,
    INSTANCE_POLICY_NAME,
    controller_role_name,
    create_controller_role,
)
from pygirder.cloud.fleet.launch import UpOptions, up
from pygirder.cloud.fleet.naming import new_fleet_id
from pygirder.cloud.fleet.teardown import down, find_orphans, sweep
from pygirder.cloud.policy import INSTANCE_ROLE_PATTERN, boundary_arn


def _up(make_aws, config, built, boto, refusals: int = 0, **kw: Any) -> tuple[Any, dict[str, Any]]:
    from pygirder.cloud.account import account_resources, setup
    from pygirder.cloud.artifacts import push_artifact

    aws_, _, _ = make_aws(config)
    setup(config, aws=aws_)
    res = account_resources(config, aws=aws_)
    push_artifact(built, res["bucket"], res["artifact_prefix"])
    image = amazon_image(boto("ec2"))
    if refusals:
        _refuse_profile(aws_.client("ec2"), refusals)
    agents = StandInAgents(boto("ec2"), res["topic_arn"])
    agents.start()
    said: list[str] = []
    try:
        summary = up(
            config,
            UpOptions(workers=1, instance_types=TYPES, image_id=image, deadline_s=20,
                      image_ids=(amazon_image(boto("ec2"), "arm64"),),
                      backoff_s=(0.2, 1.0), processes="1", **kw),
            aws=aws_, say=said.append,
        )  # fmt: skip
    finally:
        agents.stop()
    return summary, {"aws": aws_, "res": res, "said": said}


def _refuse_profile(ec2: Any, times: int) -> None:
    """The first ``times`` CreateFleet calls fail as EC2 answers while it does not see a
    new instance profile yet (IAM's changes reach EC2 seconds later)."""
    from botocore.awsrequest import AWSResponse

    left = [times]

    def refuse(model: Any, **_: Any) -> Any:
        if left[0] <= 0:
            return None
        left[0] -= 1
        message = (
            "Value (arn:aws:iam::123456789012:instance-profile/pygirder/x) for parameter "
            "iamInstanceProfile.arn is invalid. Invalid IAM Instance Profile ARN"
        )
        parsed = {
            "Error": {"Code": "InvalidParameterValue", "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": 400},
        }
        return AWSResponse("https://injected.invalid", 400, {}, None), parsed

    ec2.meta.events.register("before-call.ec2.CreateFleet", refuse)


def _profile(boto, fleet: str, role: str = "redis") -> str:
    """The instance profile in ``role``'s launch template."""
    ec2 = boto("ec2")
    for template in ec2.describe_launch_templates(
        Filters=[{"Name": "tag:pygirder:fleet", "Values": [fleet]}]
    )["LaunchTemplates"]:
        tags = {t["Key"]: t["Value"] for t in template.get("Tags", [])}
        if tags.get("pygirder:role") == role:
            data = ec2.describe_launch_template_versions(
                LaunchTemplateId=template["LaunchTemplateId"]
            )["LaunchTemplateVersions"][0]["LaunchTemplateData"]
            return str(data["IamInstanceProfile"]["Arn"])
    raise AssertionError(f"no {role} launch template")


def test_up_with_the_controller_makes_its_role_and_down_removes_it(
    make_aws, config, built, boto
) -> None:
    summary, got = _up(make_aws, config, built, boto, controller=True)
    iam, res = boto("iam"), got["res"]
    name = controller_role_name(config.name, summary.fleet)
    role = iam.get_role(RoleName=name)["Role"]
    assert role["Path"] == "/pygirder/"
    assert role["PermissionsBoundary"]["PermissionsBoundaryArn"] == boundary_arn(
        "aws", res["account_id"]
    )
    document = iam.get_role_policy(RoleName=name, PolicyName=CONTROLLER_POLICY_NAME)
    assert document["PolicyDocument"] == controller_policy(
        name=config.name, fleet=summary.fleet, region=config.region,
        account_id=res["account_id"], queue_arn=res["queue_arn"], worker_role_arn=res["role_arn"],
    )  # fmt: skip
    assert INSTANCE_POLICY_NAME in iam.list_role_policies(RoleName=name)["PolicyNames"]
    profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    assert [r["RoleName"] for r in profile["Roles"]] == [name]
    # The redis node boots with it; the workers keep the setup's instance role.
    assert _profile(boto, summary.fleet) == profile["Arn"]
    assert _profile(boto, summary.fleet, "worker") == res["instance_profile_arn"]

    report = down(config, summary.fleet, aws=got["aws"])
    assert report.clean and report.removed["controller-roles"] == [name]
    left = leftovers(boto, summary.fleet)
    assert left["roles"] == [] and left["instance_profiles"] == []
    assert not any(left.values())
    assert iam.get_role(RoleName=config.resource_name("instance"))  # the setup's stays


def test_without_the_controller_the_redis_node_keeps_the_setup_s_role(
    make_aws, config, built, boto
) -> None:
    summary, got = _up(make_aws, config, built, boto)
    assert _profile(boto, summary.fleet) == got["res"]["instance_profile_arn"]
    assert leftovers(boto, summary.fleet)["roles"] == []
    down(config, summary.fleet, aws=got["aws"])


def test_sweep_finds_and_removes_an_orphaned_controller_role(make_aws, config, boto) -> None:
    from pygirder.cloud.account import account_resources, setup

    aws_, _, _ = make_aws(config)
    setup(config, aws=aws_)
    res = account_resources(config, aws=aws_)
    fleet = new_fleet_id()
    # A fleet whose up died after making the role: no instance, expired long ago.
    create_controller_role(aws_, config, res, fleet, datetime.now(UTC) - timedelta(hours=3))
    name = controller_role_name(config.name, fleet)
    found = {o.id: o for o in find_orphans(config, 7200, aws=aws_)}
    assert found[name].kind == "controller-roles" and found[name].fleet == fleet
    assert config.resource_name("instance") not in found  # the setup's role is no orphan
    report = sweep(config, 7200, yes=True, aws=aws_)
    assert not report.failures
    left = leftovers(boto, fleet)
    assert left["roles"] == [] and left["instance_profiles"] == []
    assert boto("iam").get_role(RoleName=config.resource_name("instance"))


def test_the_role_name_fits_iam_and_the_operator_s_instance_role_pattern() -> None:
    name = controller_role_name("a" * 20, new_fleet_id())
    assert len(name) <= 64
    assert fnmatch.fnmatchcase(name, INSTANCE_ROLE_PATTERN)


def test_up_waits_until_ec2_sees_the_new_instance_profile(make_aws, config, built, boto) -> None:
    summary, got = _up(make_aws, config, built, boto, refusals=2, controller=True)
    assert summary.ready("redis") == 1 and summary.ready("worker") == 1
    notes = [line for line in got["said"] if "does not see the instance profile yet" in line]
    assert len(notes) == 2
    assert down(config, summary.fleet, aws=got["aws"]).clean
