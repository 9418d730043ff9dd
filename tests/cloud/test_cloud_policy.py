"""The operator policy and the instance role's least privilege."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pygirder.cloud.policy import (
    allows_action,
    iam_action,
    instance_role_policy,
    instance_trust_policy,
    operator_policy,
    partition,
)
from pygirder.cloud.tags import TAG_MANAGED

# What the fleet and image commands will call, as the issue lists it.
FLEET_AND_IMAGE_ACTIONS = [
    "ec2:CreateFleet",
    "ec2:DeleteFleets",
    "ec2:DescribeFleets",
    "ec2:CreateLaunchTemplate",
    "ec2:CreateLaunchTemplateVersion",
    "ec2:DeleteLaunchTemplate",
    "ec2:RunInstances",
    "ec2:TerminateInstances",
    "ec2:StopInstances",
    "ec2:StartInstances",
    "ec2:CreateImage",
    "ec2:DeregisterImage",
    "ec2:DeleteSnapshot",
    "ec2:DescribeImages",
    "ec2:DescribeInstances",
    "ec2:DescribeVolumes",
    "ec2:DescribeSpotPriceHistory",
    "ec2:DeleteVolume",
    "ec2:CancelSpotInstanceRequests",
    "ec2:CreateTags",
    "iam:PassRole",
    "ssm:GetParameter",
    "ssm:GetParameters",
    "ssm:PutParameter",
    "ssm:DeleteParameter",
    "sns:Publish",
    "sqs:ReceiveMessage",
    "sqs:DeleteMessage",
    "s3:PutObject",
    "s3:GetObject",
]


def _statements(policy: dict) -> dict[str, dict]:
    return {s["Sid"]: s for s in policy["Statement"]}


def test_the_operator_policy_is_valid_iam_json_within_the_size_limit() -> None:
    policy = operator_policy()
    text = json.dumps(policy)
    assert json.loads(text) == policy
    assert policy["Version"] == "2012-10-17"
    sids = [s["Sid"] for s in policy["Statement"]]
    assert len(sids) == len(set(sids))
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        assert statement["Action"] and statement["Resource"]
        # No wildcards but the read-only Describe*.
        assert all(":" in a and "*" not in a.replace("Describe*", "") for a in statement["Action"])
    # A managed policy may hold 6,144 characters without whitespace, with a long custom
    # bucket name in the longest partition too.
    for version in (policy, operator_policy(bucket="b" * 63, partition_name="aws-us-gov")):
        assert len("".join(json.dumps(version, separators=(",", ":")).split())) < 6144


@pytest.mark.parametrize("action", FLEET_AND_IMAGE_ACTIONS)
def test_the_operator_policy_covers_the_fleet_and_image_commands(action: str) -> None:
    assert allows_action(operator_policy(), action)


def test_deleting_ec2_resources_is_limited_to_pygirder_tagged_ones() -> None:
    statement = _statements(operator_policy())["OwnEc2Only"]
    assert "ec2:DeleteVpc" in statement["Action"]
    assert "ec2:TerminateInstances" in statement["Action"]
    assert statement["Condition"] == {"StringEquals": {f"aws:ResourceTag/{TAG_MANAGED}": "true"}}
    unconditioned = [
        a
        for s in operator_policy()["Statement"]
        if "Condition" not in s
        for a in s["Action"]
        if a.startswith("ec2:") and not a.startswith("ec2:Describe")
    ]
    assert unconditioned == []


def test_everything_named_is_scoped_to_pygirder_names() -> None:
    statements = _statements(operator_policy())
    assert statements["RolesAndProfiles"]["Resource"] == [
        "arn:aws:iam::*:role/pygirder/pygirder-*-instance",
        "arn:aws:iam::*:instance-profile/pygirder/pygirder-*-instance",
    ]
    pass_role = statements["PassRoleToEc2"]
    assert pass_role["Resource"] == "arn:aws:iam::*:role/pygirder/pygirder-*-instance"
    assert pass_role["Condition"]["StringEquals"]["iam:PassedToService"] == "ec2.amazonaws.com"
    assert statements["CreateBoundary"]["Resource"] == (
        "arn:aws:iam::*:policy/pygirder/pygirder-boundary"
    )
    assert statements["Artifacts"]["Resource"] == ["arn:aws:s3:::pygirder-*"]
    assert statements["Queue"]["Resource"] == "arn:aws:sqs:*:*:pygirder-*"
    assert statements["Parameters"]["Resource"][0] == "arn:aws:ssm:*:*:parameter/pygirder/*"
    # "*" only for reads, conditioned EC2 statements and SNS subscriptions (which IAM
    # cannot name: see test_policy_lint.py).
    star = {s["Sid"] for s in operator_policy()["Statement"] if s["Resource"] == "*"}
    assert star == {
        "Read",
        "OwnEc2Only",
        "LaunchImages",
        "TagAtCreation",
        "Subscriptions",
    }
    assert all("Condition" in statements[sid] for sid in star - {"Read", "Subscriptions"})


def test_a_custom_bucket_name_is_added_to_the_policy() -> None:
    statements = _statements(operator_policy(bucket="team-artifacts"))
    assert "arn:aws:s3:::team-artifacts" in statements["Artifacts"]["Resource"]
    assert "arn:aws:s3:::team-artifacts/*" in statements["Artifacts"]["Resource"]


def test_the_instance_role_can_do_exactly_four_things() -> None:
    policy = instance_role_policy(
        name="t",
        region="eu-west-1",
        account_id="123456789012",
        bucket="b",
        artifact_prefix="artifacts/",
        topic_arn="arn:aws:sns:eu-west-1:123456789012:pygirder-t-status",
    )
    allowed = {
        (a, json.dumps(s["Resource"]))
        for s in policy["Statement"]
        for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
    }
    assert allowed == {
        ("s3:GetObject", '"arn:aws:s3:::b/artifacts/*"'),
        *{
            (a, '"arn:aws:s3:::b/results/*"')
            for a in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject")
        },
        ("s3:ListBucket", '"arn:aws:s3:::b"'),
        ("sns:Publish", '"arn:aws:sns:eu-west-1:123456789012:pygirder-t-status"'),
        *{
            (
                a,
                '["arn:aws:ssm:eu-west-1:123456789012:parameter/pygirder/t", '
                '"arn:aws:ssm:eu-west-1:123456789012:parameter/pygirder/t/*"]',
            )
            for a in ("ssm:GetParameter", "ssm:GetParameters", "ssm:GetParametersByPath")
        },
    }
    listing = next(s for s in policy["Statement"] if s["Action"] == "s3:ListBucket")
    assert listing["Condition"] == {"StringLike": {"s3:prefix": ["artifacts/*", "results/*"]}}
    assert all(s["Effect"] == "Allow" for s in policy["Statement"])


def test_only_ec2_may_assume_the_instance_role() -> None:
    (statement,) = instance_trust_policy()["Statement"]
    assert statement["Principal"] == {"Service": "ec2.amazonaws.com"}
    assert statement["Action"] == "sts:AssumeRole"


@pytest.mark.parametrize(
    ("service", "operation", "action"),
    [
        ("ec2", "CreateVpc", "ec2:CreateVpc"),
        ("s3", "HeadBucket", "s3:ListBucket"),
        ("s3", "PutBucketEncryption", "s3:PutEncryptionConfiguration"),
        ("s3", "PutPublicAccessBlock", "s3:PutBucketPublicAccessBlock"),
        ("budgets", "CreateBudget", "budgets:ModifyBudget"),
        ("budgets", "DescribeBudget", "budgets:ViewBudget"),
        ("resourcegroupstaggingapi", "GetResources", "tag:GetResources"),
        ("cloudwatch", "PutMetricAlarm", "cloudwatch:PutMetricAlarm"),
    ],
)
def test_operations_map_to_the_iam_actions_that_authorise_them(
    service: str, operation: str, action: str
) -> None:
    assert iam_action(service, operation) == action


def test_partitions() -> None:
    assert partition("us-east-1") == "aws"
    assert partition("cn-north-1") == "aws-cn"
    assert partition("us-gov-west-1") == "aws-us-gov"
    assert _statements(operator_policy(partition_name="aws-cn"))["Artifacts"]["Resource"] == [
        "arn:aws-cn:s3:::pygirder-*"
    ]


def test_the_documented_policy_is_the_printed_one() -> None:
    doc = Path(__file__).parents[2] / "docs" / "aws-setup.md"
    text = doc.read_text()
    blocks = re.findall(r"```json\n(.*?)```", text[text.index("## Exact permissions") :], re.S)
    assert json.loads(blocks[0]) == operator_policy()


def test_the_documented_boundary_is_the_printed_one() -> None:
    from pygirder.cloud.policy import boundary_policy

    doc = Path(__file__).parents[2] / "docs" / "aws-setup.md"
    text = doc.read_text()
    blocks = re.findall(
        r"```json\n(.*?)```", text[text.index("### The permissions boundary") :], re.S
    )
    assert json.loads(blocks[0]) == boundary_policy()
