"""The redis node: on-demand Graviton by default, booted from the image of its architecture.

Against moto in server mode: ``StandInAgents`` announce what an agent would.  moto
serves DescribeInstanceTypes (``ProcessorInfo.SupportedArchitectures``) and Amazon
images of both architectures, so each role's launch template is checked for the
image of its type's architecture.
"""

from __future__ import annotations

from typing import Any

import pytest
from fleet_helpers import TYPES, StandInAgents, amazon_image, fleet_instances

from pygirder.cloud.account import account_resources, setup
from pygirder.cloud.artifacts import push_artifact
from pygirder.cloud.errors import CloudConfigError, FleetError
from pygirder.cloud.fleet.converge import read_target
from pygirder.cloud.fleet.launch import UpOptions, up
from pygirder.cloud.fleet.teardown import down
from pygirder.cloud.tags import TAG_FLEET, TAG_ROLE, from_tag_list


@pytest.fixture
def account(make_aws, config, built, boto) -> dict[str, Any]:
    aws_, _, _ = make_aws(config)
    setup(config, aws=aws_)
    res = account_resources(config, aws=aws_)
    push_artifact(built, res["bucket"], res["artifact_prefix"])
    ec2 = boto("ec2")
    return {"config": config, "aws": aws_, "res": res,
            "x86": amazon_image(ec2, "x86_64"), "arm": amazon_image(ec2, "arm64")}  # fmt: skip


def _options(**kw: Any) -> UpOptions:
    base: dict[str, Any] = dict(
        workers=1, instance_types=TYPES, deadline_s=20, backoff_s=(0.2, 1.0), processes="1"
    )
    return UpOptions(**{**base, **kw})


def _templates(boto, fleet: str) -> dict[str, dict[str, Any]]:
    ec2 = boto("ec2")
    found = ec2.describe_launch_templates(
        Filters=[{"Name": f"tag:{TAG_FLEET}", "Values": [fleet]}]
    )["LaunchTemplates"]
    out = {}
    for template in found:
        data = ec2.describe_launch_template_versions(LaunchTemplateId=template["LaunchTemplateId"])[
            "LaunchTemplateVersions"
        ][0]["LaunchTemplateData"]
        out[from_tag_list(template["Tags"])[TAG_ROLE]] = data
    return out


def test_each_role_boots_the_image_of_its_architecture_and_redis_is_on_demand_graviton(
    account, boto
) -> None:
    config, aws_ = account["config"], account["aws"]
    assert config.redis_instance_type == "m7g.medium"
    agents = StandInAgents(boto("ec2"), account["res"]["topic_arn"])
    agents.start()
    try:
        summary = up(config, _options(image_ids=(account["arm"], account["x86"])), aws=aws_)
    finally:
        agents.stop()
    try:
        templates = _templates(boto, summary.fleet)
        assert templates["redis"]["ImageId"] == account["arm"]
        assert templates["worker"]["ImageId"] == account["x86"]
        by_role = {from_tag_list(i["Tags"])[TAG_ROLE]: i for i in
                   fleet_instances(boto, summary.fleet)}  # fmt: skip
        redis = by_role["redis"]
        assert redis["InstanceType"] == "m7g.medium"
        assert redis.get("InstanceLifecycle", "on-demand") != "spot"
        assert by_role["worker"]["InstanceType"] in TYPES
        assert by_role["worker"]["InstanceLifecycle"] == "spot"
        # The target remembers the redis node's type, for a replacement.
        assert read_target(aws_, config.name, summary.fleet).redis_instance_type == "m7g.medium"
    finally:
        down(config, summary.fleet, aws=aws_)


def test_a_role_without_an_image_of_its_architecture_fails_before_launching(account, boto) -> None:
    config, aws_ = account["config"], account["aws"]
    with pytest.raises(FleetError) as caught:
        up(config, _options(image_id=account["x86"]), aws=aws_)
    text = str(caught.value)
    assert "redis type(s) m7g.medium are arm64" in text
    assert "`pygirder cloud image build --arch arm64`" in text
    assert "redis_instance_type" in text
    assert not boto("ec2").describe_instances(
        Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}]
    )["Reservations"]

    # An x86 redis node needs no arm64 image.
    agents = StandInAgents(boto("ec2"), account["res"]["topic_arn"])
    agents.start()
    try:
        summary = up(
            config, _options(image_id=account["x86"], redis_instance_type="t3.small"), aws=aws_
        )
    finally:
        agents.stop()
    try:
        assert _templates(boto, summary.fleet)["redis"]["ImageId"] == account["x86"]
    finally:
        down(config, summary.fleet, aws=aws_)


def test_types_of_mixed_or_unknown_architectures_are_refused(account) -> None:
    config, aws_ = account["config"], account["aws"]
    images = (account["x86"], account["arm"])
    with pytest.raises(CloudConfigError, match=r"worker types mix architectures \(arm64: m7g"):
        up(config, _options(instance_types=("m7g.large", "m7a.large"), image_ids=images),
           aws=aws_)  # fmt: skip
    with pytest.raises(CloudConfigError, match=r"zz9\.large"):
        up(config, _options(redis_instance_type="zz9.large", image_ids=images), aws=aws_)
    got = aws_.call("ec2", "describe_images", Owners=["amazon"],
                    Filters=[{"Name": "architecture", "Values": ["x86_64"]}])  # fmt: skip
    second = next(i["ImageId"] for i in got["Images"] if i["ImageId"] != account["x86"])
    with pytest.raises(CloudConfigError, match="both x86_64: give one per architecture"):
        up(config, _options(image_ids=(account["x86"], second)), aws=aws_)


def test_up_on_a_fleet_whose_redis_node_is_lost_replaces_it_and_records_its_address(
    fleet, boto, tmp_path
) -> None:
    import json

    from cloud_helpers import SSH_FROM
    from typer.testing import CliRunner

    from pygirder.cloud.cli import app
    from pygirder.cloud.fleet.converge import Target, converge, role_sizes

    config, aws_, fid = fleet["config"], fleet["aws"], fleet["fleet"]
    ssm, ec2 = boto("ssm"), boto("ec2")
    parameter = f"/pygirder/t/{fid}/redis-address"
    [old] = [i for i in fleet_instances(boto, fid) if from_tag_list(i["Tags"])[TAG_ROLE] == "redis"]
    assert ssm.get_parameter(Name=parameter)["Parameter"]["Value"] == (
        f"redis://{old['PrivateIpAddress']}:6379/0"
    )
    agents = StandInAgents(ec2, fleet["res"]["topic_arn"])  # announces the replacement
    agents.start()
    ec2.terminate_instances(InstanceIds=[old["InstanceId"]])  # as a lost node ends
    toml = tmp_path / "pygirder.toml"
    toml.write_text(
        f'[cloud]\nname = "t"\nssh_from = "{SSH_FROM}"\npublic_key_file = "id_ed25519.pub"\n'
        'cluster_key_file = "keys/cluster.pem"\n'
    )
    shown = CliRunner().invoke(app, ["fleet", "--config", str(toml)])
    assert shown.exit_code == 0, shown.output
    said = " ".join(shown.stderr.split())
    assert "is lost" in said and f"`pygirder cloud up --fleet {fid}` launches a replacement" in said
    as_json = CliRunner().invoke(app, ["fleet", "--config", str(toml), "--json"])
    roles = {r["role"]: (r["target"], r["live"]) for r in json.loads(as_json.stdout)["roles"]}
    assert roles["redis"] == (1, 0)

    asked_for: list[dict] = []
    aws_.client("ec2").meta.events.register(
        "provide-client-params.ec2.CreateFleet", lambda params, **_: asked_for.append(params)
    )
    try:
        report = converge(config, fid, Target(workers=2, instance_types=TYPES), aws=aws_,
                          deadline_s=20)  # fmt: skip
    finally:
        agents.stop()
    [new] = report.launched["redis"]
    assert new != old["InstanceId"] and not report.problems
    [inst] = [i for i in fleet_instances(boto, fid) if i["InstanceId"] == new]
    tags = from_tag_list(inst["Tags"])
    assert tags[TAG_ROLE] == "redis" and tags["pygirder:launch"] == f"{fid}-redis"
    assert inst["InstanceType"] == "m7g.medium"  # the type the fleet was launched with
    assert inst.get("InstanceLifecycle", "on-demand") != "spot"
    [asked] = [c for c in asked_for if c["TargetCapacitySpecification"]["TotalTargetCapacity"]]
    spec = asked["LaunchTemplateConfigs"][0]["LaunchTemplateSpecification"]
    assert spec["LaunchTemplateId"] == _template_id(boto, fid, "redis")  # the fleet's own
    assert asked["TargetCapacitySpecification"]["DefaultTargetCapacityType"] == "on-demand"
    assert ssm.get_parameter(Name=parameter)["Parameter"]["Value"] == (
        f"redis://{inst['PrivateIpAddress']}:6379/0"
    )
    sizes = {s.role: (s.target, s.live) for s in role_sizes(aws_, "t", fid)}
    assert sizes == {"redis": (1, 1), "worker": (2, 2)}
    # Converging again changes nothing: the replacement is the fleet's redis node.
    again = converge(config, fid, Target(workers=2, instance_types=TYPES), aws=aws_)
    assert not again.changed


def _template_id(boto, fleet: str, role: str) -> str:
    found = boto("ec2").describe_launch_templates(
        Filters=[{"Name": f"tag:{TAG_FLEET}", "Values": [fleet]},
                 {"Name": f"tag:{TAG_ROLE}", "Values": [role]}]
    )["LaunchTemplates"]  # fmt: skip
    return found[0]["LaunchTemplateId"]
