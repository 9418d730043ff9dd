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
