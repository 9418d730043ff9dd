"""Every IAM policy pygirder writes, checked against IAM's own catalogue and for escalation.

moto accepts what AWS refuses (actions scoped to ARNs they do not support, unknown
actions), so ``parliament``'s copy of the IAM service catalogue stands in for real
AWS here.  :func:`allowed` is a small evaluator of Allow statements (actions, resource
patterns, StringEquals / StringLike / Null conditions, policy variables): enough to
ask, for a request an attacker holding the operator policy might make, whether any
statement lets it through.
"""

from __future__ import annotations

import fnmatch
import gc
import json
import re
import warnings
from typing import Any

import pytest

with warnings.catch_warnings():
    # parliament leaves its config file open when imported.
    warnings.simplefilter("ignore", ResourceWarning)
    from parliament import analyze_policy_string, expand_action, iam_definition

    gc.collect()

from pygirder.cloud.policy import (
    BOUNDARY_LOCKED,
    allows_action,
    boundary_arn,
    boundary_policy,
    instance_role_policy,
    operator_policy,
)
from pygirder.cloud.tags import TAG_MANAGED

ACCOUNT = "123456789012"
BOUNDARY = boundary_arn("aws", ACCOUNT)

# Mutating actions that accept only Resource "*" and take no condition that would
# narrow them, each with why granting it is safe.
STAR_ALLOWED = {
    "sns:GetSubscriptionAttributes": "reads a subscription's settings",
    "sns:SetSubscriptionAttributes": (
        "subscription ARNs cannot be named in IAM; at worst it changes the delivery "
        "settings of a subscription, which grants nobody anything"
    ),
    "sns:Unsubscribe": "subscription ARNs cannot be named in IAM; it only removes a delivery",
}

# parliament types iam:PermissionsBoundary as String while its value is an ARN; AWS
# documents StringEquals/StringLike for it, which is what the policy uses.
USABLE_TYPE_MISMATCH_KEYS = {"iam:PermissionsBoundary"}


def _policies() -> dict[str, dict[str, Any]]:
    return {
        "operator": operator_policy(),
        "operator, custom bucket, aws-us-gov": operator_policy(
            bucket="team-artifacts", partition_name="aws-us-gov"
        ),
        "permissions boundary": boundary_policy(),
        "instance role": instance_role_policy(
            name="t",
            region="eu-west-1",
            account_id=ACCOUNT,
            bucket="b",
            artifact_prefix="artifacts/",
            topic_arn=f"arn:aws:sns:eu-west-1:{ACCOUNT}:pygirder-t-status",
        ),
    }


def _access_level(service: str, action: str) -> str:
    for svc in iam_definition:
        if svc["prefix"] == service:
            for privilege in svc["privileges"]:
                if privilege["privilege"].lower() == action.lower():
                    return str(privilege["access_level"])
    raise KeyError(f"{service}:{action}")


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def lint(policy: dict[str, Any]) -> list[str]:
    """What real IAM would refuse or what grants too much, one line per problem."""
    problems = []
    analysis = analyze_policy_string(json.dumps(policy), include_community_auditors=False)
    for finding in analysis.findings:
        if finding.issue == "RESOURCE_STAR":
            continue  # judged below, with the statement's conditions in view
        if finding.issue == "MISMATCHED_TYPE_BUT_USABLE" and any(
            key in json.dumps(policy) for key in USABLE_TYPE_MISMATCH_KEYS
        ):
            continue
        problems.append(f"{finding.issue}: {finding.detail}")
    for statement in policy["Statement"]:
        if statement["Effect"] != "Allow" or "*" not in _as_list(statement["Resource"]):
            continue
        if statement.get("Condition"):
            continue
        for pattern in _as_list(statement["Action"]):
            for expanded in expand_action(pattern, raise_exceptions=False):
                action = f"{expanded['service']}:{expanded['action']}"
                level = _access_level(expanded["service"], expanded["action"])
                if level not in ("Read", "List") and action not in STAR_ALLOWED:
                    problems.append(
                        f"{statement.get('Sid')}: {level} action {action} on '*' with no condition"
                    )
    return problems


@pytest.mark.parametrize("which", list(_policies()))
def test_every_policy_passes_iam_s_catalogue(which: str) -> None:
    assert lint(_policies()[which]) == []


def test_the_lint_catches_what_aws_would_refuse() -> None:
    """The lint itself: the defects of an earlier operator policy are found."""
    bad = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "Subscriptions",
                "Effect": "Allow",
                "Action": ["sns:Unsubscribe", "sns:GetSubscriptionAttributes"],
                "Resource": "arn:aws:sns:*:*:pygirder-*",
            },
            {
                "Sid": "Create",
                "Effect": "Allow",
                "Action": ["ec2:CreateVpc", "ec2:TerminateInstances", "ec2:CreateTags"],
                "Resource": "*",
            },
            {"Sid": "Typo", "Effect": "Allow", "Action": "ec2:RunInstance", "Resource": "*"},
        ],
    }
    problems = "\n".join(lint(bad))
    assert "RESOURCE_MISMATCH" in problems and "sns:Unsubscribe" in problems
    for action in ("ec2:CreateVpc", "ec2:TerminateInstances", "ec2:CreateTags"):
        assert f"action {action} on '*' with no condition" in problems
    assert "UNKNOWN_ACTION" in problems


# ----------------------------------------------------------------- escalation


def _substitute(value: str, context: dict[str, str]) -> str:
    return re.sub(r"\$\{([^}]+)\}", lambda m: context.get(m.group(1), m.group(0)), value)


def _condition_holds(condition: dict[str, Any], context: dict[str, str]) -> bool:
    for operator, tests in condition.items():
        for key, wanted in tests.items():
            values = [_substitute(str(v), context) for v in _as_list(wanted)]
            have = context.get(key)
            if operator == "Null":
                if (have is None) != (values[0] == "true"):
                    return False
            elif operator == "StringEquals":
                if have is None or have not in values:
                    return False
            elif operator == "StringEqualsIfExists":
                if have is not None and have not in values:
                    return False
            elif operator == "StringLike":
                if have is None or not any(fnmatch.fnmatchcase(have, v) for v in values):
                    return False
            else:
                raise AssertionError(f"the evaluator does not know {operator}")
    return True


def allowed(policy: dict[str, Any], action: str, resource: str, **context: str) -> bool:
    """Would some Allow statement of ``policy`` let ``action`` on ``resource`` through?"""
    context = {"aws:PrincipalAccount": ACCOUNT, **context}
    for statement in policy["Statement"]:
        if statement["Effect"] != "Allow":
            continue
        if not any(
            fnmatch.fnmatchcase(action.lower(), a.lower()) for a in _as_list(statement["Action"])
        ):
            continue
        if not any(fnmatch.fnmatchcase(resource, r) for r in _as_list(statement["Resource"])):
            continue
        if _condition_holds(statement.get("Condition", {}), context):
            return True
    return False


POLICY = operator_policy()
MANAGED = {f"aws:ResourceTag/{TAG_MANAGED}": "true"}
TAGGED_REQUEST = {f"aws:RequestTag/{TAG_MANAGED}": "true"}
ROLE = f"arn:aws:iam::{ACCOUNT}:role/pygirder/pygirder-t-instance"
FOREIGN_INSTANCE = f"arn:aws:ec2:us-east-1:{ACCOUNT}:instance/i-0123456789abcdef0"


def test_roles_can_be_made_and_given_rights_only_with_the_boundary() -> None:
    for action in ("iam:CreateRole", "iam:PutRolePolicy", "iam:PutRolePermissionsBoundary"):
        assert allowed(POLICY, action, ROLE, **{"iam:PermissionsBoundary": BOUNDARY})
        assert not allowed(POLICY, action, ROLE)  # no boundary
        other = f"arn:aws:iam::{ACCOUNT}:policy/pygirder/admin"
        assert not allowed(POLICY, action, ROLE, **{"iam:PermissionsBoundary": other})
    admin = f"arn:aws:iam::{ACCOUNT}:role/pygirder/admin"
    assert not allowed(POLICY, "iam:CreateRole", admin, **{"iam:PermissionsBoundary": BOUNDARY})
    assert not allowed(
        POLICY, "iam:AttachRolePolicy", ROLE, **{"iam:PermissionsBoundary": BOUNDARY}
    )


def test_the_boundary_and_trust_policies_cannot_be_changed() -> None:
    for action in BOUNDARY_LOCKED:
        for resource in (BOUNDARY, ROLE):
            assert not allowed(POLICY, action, resource, **{"iam:PermissionsBoundary": BOUNDARY})
    assert "iam:UpdateAssumeRolePolicy" in BOUNDARY_LOCKED
    assert "iam:DeleteRolePermissionsBoundary" in BOUNDARY_LOCKED
    assert allowed(POLICY, "iam:CreatePolicy", BOUNDARY)  # made once, when missing
    assert not allowed(POLICY, "iam:CreatePolicy", f"arn:aws:iam::{ACCOUNT}:policy/pygirder/x")


def test_only_the_instance_role_may_be_passed_and_only_to_ec2() -> None:
    ec2 = {"iam:PassedToService": "ec2.amazonaws.com"}
    assert allowed(POLICY, "iam:PassRole", ROLE, **ec2)
    assert not allowed(
        POLICY, "iam:PassRole", ROLE, **{"iam:PassedToService": "lambda.amazonaws.com"}
    )
    assert not allowed(POLICY, "iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/pygirder/admin", **ec2)
    assert not allowed(POLICY, "iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/admin", **ec2)


def test_tags_are_written_only_by_creates() -> None:
    assert not allowed(POLICY, "ec2:CreateTags", FOREIGN_INSTANCE)
    assert not allowed(POLICY, "ec2:CreateTags", FOREIGN_INSTANCE, **MANAGED)
    assert allowed(
        POLICY, "ec2:CreateTags", FOREIGN_INSTANCE, **{"ec2:CreateAction": "RunInstances"}
    )


@pytest.mark.parametrize(
    "action",
    [
        "ec2:TerminateInstances",
        "ec2:ModifyInstanceAttribute",
        "ec2:AuthorizeSecurityGroupIngress",
        "ec2:CreateRoute",
        "ec2:ReplaceRoute",
        "ec2:CreateLaunchTemplateVersion",
        "ec2:ModifyLaunchTemplate",
        "ec2:DeleteVpc",
    ],
)
def test_changes_and_deletes_reach_only_pygirder_resources(action: str) -> None:
    assert allowed(POLICY, action, FOREIGN_INSTANCE, **MANAGED)
    assert not allowed(POLICY, action, FOREIGN_INSTANCE)
    assert not allowed(POLICY, action, FOREIGN_INSTANCE, **{f"aws:ResourceTag/{TAG_MANAGED}": "x"})


def test_creates_must_tag_what_they_make() -> None:
    vpc = f"arn:aws:ec2:us-east-1:{ACCOUNT}:vpc/vpc-1"
    assert allowed(POLICY, "ec2:CreateVpc", vpc, **TAGGED_REQUEST)
    assert not allowed(POLICY, "ec2:CreateVpc", vpc)
    instance = f"arn:aws:ec2:us-east-1:{ACCOUNT}:instance/*"
    assert allowed(POLICY, "ec2:RunInstances", instance, **TAGGED_REQUEST)
    assert not allowed(POLICY, "ec2:RunInstances", instance)
    # The images a launch reads: Amazon's or this account's, not a stranger's.
    image = "arn:aws:ec2:us-east-1::image/ami-1"
    assert allowed(POLICY, "ec2:RunInstances", image, **{"ec2:Owner": "amazon"})
    assert allowed(POLICY, "ec2:RunInstances", image, **{"ec2:Owner": ACCOUNT})
    assert not allowed(POLICY, "ec2:RunInstances", image, **{"ec2:Owner": "999999999999"})


def test_the_boundary_caps_every_instance_role() -> None:
    """What the inline instance policy grants lies inside the boundary."""
    boundary = boundary_policy()
    own = {"aws:ResourceAccount": ACCOUNT}
    for statement in _policies()["instance role"]["Statement"]:
        for action in _as_list(statement["Action"]):
            for resource in _as_list(statement["Resource"]):
                assert allowed(boundary, action, resource.replace("*", "x"), **own), action
    assert not allowed(boundary, "s3:GetObject", "arn:aws:s3:::b/x", **{"aws:ResourceAccount": "1"})
    assert not allowed(boundary, "iam:CreateRole", ROLE, **own)
    assert not allowed(boundary, "ec2:RunInstances", "*", **own)


def _satisfying(condition: dict[str, Any]) -> dict[str, str]:
    """A request context that meets ``condition`` (first value of each key)."""
    context = {}
    for operator, tests in condition.items():
        for key, wanted in tests.items():
            value = str(_as_list(wanted)[0])
            context[key] = "CreateFleet" if operator == "Null" else _substitute(value, {})
    return context


def _controller_policy() -> dict[str, Any]:
    from pygirder.cloud.fleet.controller import controller_policy

    return controller_policy(
        name="t", fleet=CONTROLLER_FLEET, region="us-east-1", account_id=ACCOUNT,
        queue_arn=f"arn:aws:sqs:us-east-1:{ACCOUNT}:pygirder-t-status", worker_role_arn=ROLE,
    )  # fmt: skip


CONTROLLER_FLEET = "fl-20260101-0000-0123456789abcdef"
CONTROLLER_ROLE = f"arn:aws:iam::{ACCOUNT}:role/pygirder/pygirder-t-0123456789abcdef-fleet-instance"


def test_the_boundary_caps_the_controller_role() -> None:
    """Every grant of the controller's policy, as the controller's requests make it
    (what it launches tagged pygirder:managed=true, like every fleet resource), lies
    inside the boundary; what the operator may not do, the boundary refuses too."""
    boundary = boundary_policy()
    tagged = {**MANAGED, **TAGGED_REQUEST, "aws:ResourceAccount": ACCOUNT}
    for statement in _controller_policy()["Statement"]:
        context = {**tagged, **_satisfying(statement.get("Condition", {}))}
        for action in _as_list(statement["Action"]):
            for resource in _as_list(statement["Resource"]):
                arn = resource.replace("*", "x")
                assert allowed(boundary, action, arn, **context), (statement["Sid"], action)
    instance = FOREIGN_INSTANCE
    assert not allowed(boundary, "ec2:TerminateInstances", instance)  # not pygirder's
    assert not allowed(boundary, "ec2:RunInstances", f"arn:aws:ec2:us-east-1:{ACCOUNT}:instance/x")
    assert not allowed(boundary, "ec2:CreateTags", instance, **MANAGED)  # no retagging
    ec2 = {"iam:PassedToService": "ec2.amazonaws.com"}
    assert not allowed(boundary, "iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/admin", **ec2)
    assert not allowed(
        boundary, "iam:PassRole", ROLE, **{"iam:PassedToService": "lambda.amazonaws.com"}
    )
    for action in ("iam:CreateRole", "iam:PutRolePolicy", "iam:AttachRolePolicy",
                   "ec2:CreateLaunchTemplateVersion", "ec2:ModifyInstanceAttribute",
                   "ssm:PutParameter", "sqs:SendMessage"):  # fmt: skip
        assert not allows_action(boundary, action), action
    # objects are written under results/ only (the durable result store), never the
    # artifacts the instances install
    own = {"aws:ResourceAccount": ACCOUNT}
    assert allowed(boundary, "s3:PutObject", "arn:aws:s3:::b/results/x", **own)
    assert not allowed(boundary, "s3:PutObject", "arn:aws:s3:::b/artifacts/x", **own)


def test_the_operator_makes_controller_roles_only_with_the_boundary() -> None:
    """The controller's role is an instance role by name, so the operator may create it
    and give it inline policies only with the boundary; no managed policy (an
    administrator's) can be attached, and the boundary cannot be taken off."""
    bounded = {"iam:PermissionsBoundary": BOUNDARY}
    for action in ("iam:CreateRole", "iam:PutRolePolicy"):
        assert allowed(POLICY, action, CONTROLLER_ROLE, **bounded)
        assert not allowed(POLICY, action, CONTROLLER_ROLE)
        other = f"arn:aws:iam::{ACCOUNT}:policy/pygirder/admin"
        assert not allowed(POLICY, action, CONTROLLER_ROLE, **{"iam:PermissionsBoundary": other})
    admin = "arn:aws:iam::aws:policy/AdministratorAccess"
    for action in ("iam:AttachRolePolicy", "iam:DeleteRolePermissionsBoundary",
                   "iam:UpdateAssumeRolePolicy"):  # fmt: skip
        assert not allowed(POLICY, action, CONTROLLER_ROLE, **bounded, **{"iam:PolicyARN": admin})
    # Only under /pygirder/ and by the instance roles' name.
    for name in ("role/pygirder/pygirder-t-0123-controller", "role/pygirder-t-x-fleet-instance"):
        assert not allowed(POLICY, "iam:CreateRole", f"arn:aws:iam::{ACCOUNT}:{name}", **bounded)
    profile = CONTROLLER_ROLE.replace(":role/", ":instance-profile/")
    assert allowed(POLICY, "iam:CreateInstanceProfile", profile)
    assert allowed(POLICY, "iam:PassRole", CONTROLLER_ROLE, **{
        "iam:PassedToService": "ec2.amazonaws.com"})  # fmt: skip
    assert allowed(POLICY, "iam:ListRoles", "*")  # sweep finds the roles fleets left
