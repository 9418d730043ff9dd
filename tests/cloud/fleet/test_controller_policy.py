"""The controller's instance role: IAM's catalogue accepts it, it reaches only its fleet,
and it allows every call the controller makes."""

from __future__ import annotations

import redis
from fleet_helpers import TYPES, workers_of
from test_policy_lint import ACCOUNT, allowed, lint

from pygirder.cloud.fleet.controller import Controller, controller_policy
from pygirder.cloud.fleet.converge import Target, target_parameter, write_target
from pygirder.cloud.policy import allows_action, iam_action
from pygirder.cloud.tags import TAG_FLEET, TAG_MANAGED, utcnow

FLEET = "fl-20260101-0000-0123456789abcdef"
WORKER_ROLE = f"arn:aws:iam::{ACCOUNT}:role/pygirder/pygirder-t-instance"
POLICY = controller_policy(
    name="t", fleet=FLEET, region="us-east-1", account_id=ACCOUNT,
    queue_arn=f"arn:aws:sqs:us-east-1:{ACCOUNT}:pygirder-t-status",
    worker_role_arn=WORKER_ROLE,
)  # fmt: skip
EC2 = f"arn:aws:ec2:us-east-1:{ACCOUNT}"
INSTANCE = f"{EC2}:instance/i-0123456789abcdef0"


def test_the_controller_policy_passes_iam_s_catalogue() -> None:
    assert lint(POLICY) == []


def test_it_terminates_and_launches_only_for_its_own_fleet() -> None:
    own = {f"aws:ResourceTag/{TAG_FLEET}": FLEET}
    other = {f"aws:ResourceTag/{TAG_FLEET}": "fl-20260101-0000-ffffffffffffffff"}
    assert allowed(POLICY, "ec2:TerminateInstances", INSTANCE, **own)
    assert not allowed(POLICY, "ec2:TerminateInstances", INSTANCE, **other)
    assert not allowed(POLICY, "ec2:TerminateInstances", INSTANCE, **{
        f"aws:ResourceTag/{TAG_MANAGED}": "true"})  # fmt: skip
    template = f"{EC2}:launch-template/lt-1"
    managed = {f"aws:ResourceTag/{TAG_MANAGED}": "true"}
    assert allowed(POLICY, "ec2:CreateFleet", template, **managed, **own)
    assert not allowed(POLICY, "ec2:CreateFleet", template, **managed, **other)
    assert not allowed(POLICY, "ec2:CreateFleet", template)  # not pygirder's
    subnet = f"{EC2}:subnet/subnet-1"
    assert allowed(POLICY, "ec2:RunInstances", subnet, **managed)
    assert not allowed(POLICY, "ec2:RunInstances", subnet)
    new = f"{EC2}:instance/*"
    assert allowed(POLICY, "ec2:RunInstances", new, **{f"aws:RequestTag/{TAG_FLEET}": FLEET})
    assert not allowed(POLICY, "ec2:RunInstances", new)  # untagged: refused
    assert not allowed(POLICY, "ec2:CreateTags", INSTANCE, **own)  # no retagging after launch
    at_launch = {"ec2:CreateAction": "CreateFleet"}
    assert allowed(POLICY, "ec2:CreateTags", INSTANCE, **at_launch, **{
        f"aws:RequestTag/{TAG_FLEET}": FLEET})  # fmt: skip
    assert not allowed(POLICY, "ec2:CreateTags", INSTANCE, **at_launch, **{
        f"aws:RequestTag/{TAG_FLEET}": "fl-20260101-0000-ffffffffffffffff"})  # fmt: skip
    image = "arn:aws:ec2:us-east-1::image/ami-1"
    assert not allowed(POLICY, "ec2:RunInstances", image, **{"ec2:Owner": "999999999999"})


def test_it_cannot_escalate() -> None:
    assert allowed(
        POLICY, "iam:PassRole", WORKER_ROLE, **{"iam:PassedToService": "ec2.amazonaws.com"}
    )
    assert not allowed(POLICY, "iam:PassRole", WORKER_ROLE,
                       **{"iam:PassedToService": "lambda.amazonaws.com"})  # fmt: skip
    admin = f"arn:aws:iam::{ACCOUNT}:role/admin"
    assert not allowed(
        POLICY, "iam:PassRole", admin, **{"iam:PassedToService": "ec2.amazonaws.com"}
    )
    for action in ("iam:CreateRole", "iam:PutRolePolicy", "ec2:CreateLaunchTemplateVersion",
                   "ec2:ModifyInstanceAttribute", "ssm:PutParameter", "s3:GetObject"):  # fmt: skip
        assert not allows_action(POLICY, action), action


def test_every_call_the_controller_makes_is_allowed(fleet, boto, redis_url) -> None:
    target = Target(workers=2, instance_types=TYPES,
                    subnets={"worker": [fleet["res"]["private_subnet_id"]]})  # fmt: skip
    write_target(fleet["aws"], fleet["config"], fleet["fleet"], target, utcnow())
    calls = fleet["faults"].calls
    start = len(calls)
    control = Controller(
        fleet["config"], fleet["fleet"], aws=fleet["aws"], queue_url=fleet["res"]["queue_url"],
        grid=redis.Redis.from_url(redis_url),
    )  # fmt: skip
    boto("ec2").terminate_instances(InstanceIds=[workers_of(boto, fleet["fleet"])[0]["InstanceId"]])
    assert control.step().launched  # a replacement
    target.workers = 1  # written by the operator (with its own client), not the controller
    boto("ssm").put_parameter(Name=target_parameter("t", fleet["fleet"]), Value=target.to_json(),
                              Type="String", Overwrite=True)  # fmt: skip
    control.drainer.timeout_s = 0
    control.step()  # a drain
    control.step()  # and its end
    used = {iam_action(*call.split(".")) for call in calls[start:]}
    assert {"ec2:CreateFleet", "ec2:TerminateInstances", "sqs:ReceiveMessage"} <= used
    assert sorted(a for a in used if not allows_action(POLICY, a)) == []
