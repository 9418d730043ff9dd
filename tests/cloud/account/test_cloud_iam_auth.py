"""Run setup, status and teardown with credentials that hold only the operator policy.

moto in server mode can enforce IAM: ``POST /moto-api/reset-auth`` with a count of
0 makes it authenticate and authorise every request from then on (the server-mode
twin of ``set_initial_no_auth_action_count``).  Its evaluator is basic, though:

* most services authorise against resource ``"*"``, so an Allow scoped to ARNs
  never matches (getmoto/moto#6514, #9581), and any ``Condition`` counts as a denial;
* some actions are named after the API operation, not the IAM action
  (``s3:HeadBucket`` for ``s3:ListBucket``, ``budgets:CreateBudget`` for
  ``budgets:ModifyBudget``, ``monitoring:*`` for ``cloudwatch:*``).

So the user gets :func:`moto_view` of the real policy: for every operation of the
services pygirder uses whose IAM action the real policy allows, moto's name for that
operation, on ``"*"``.  That checks the *actions* of the policy are sufficient; the
resource scoping and conditions are checked by test_cloud_policy.py instead.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from cloud_helpers import EXPECTED_AFTER_SETUP, counts, fresh_session, inventory

from pygirder.cloud.account import setup, status, teardown
from pygirder.cloud.errors import AccessDeniedError
from pygirder.cloud.policy import allows_action, iam_action, operator_policy

SERVICES = (
    "ec2",
    "iam",
    "s3",
    "sns",
    "sqs",
    "cloudwatch",
    "budgets",
    "ssm",
    "sts",
    "resourcegroupstaggingapi",
)


def moto_view(policy: dict[str, Any]) -> list[dict[str, Any]]:
    """The real policy's permissions, as managed policies moto can evaluate."""
    session = fresh_session("us-east-1")
    granted: set[str] = set()
    for service in SERVICES:
        model = session._session.get_service_model(service)
        prefix = model.signing_name
        for operation in model.operation_names:
            action = iam_action(service, operation)
            if allows_action(policy, action):
                granted.update({action, f"{prefix}:{operation}"})
    actions = sorted(granted)
    chunks = [actions[i : i + 120] for i in range(0, len(actions), 120)]
    return [
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": c, "Resource": "*"}]}
        for c in chunks
    ]


def _post(url: str, body: bytes) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "text/plain"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@contextmanager
def iam_enforced(moto_url: str) -> Iterator[None]:
    """Every request to moto is authenticated and authorised inside the block."""
    previous = _post(f"{moto_url}/moto-api/reset-auth", b"0")
    try:
        yield
    finally:
        _post(
            f"{moto_url}/moto-api/reset-auth",
            previous["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"].encode(),
        )


def operator_keys(boto, policy: dict[str, Any]) -> dict[str, str]:
    """An IAM user holding exactly ``moto_view(policy)``, and its access key."""
    iam = boto("iam")
    iam.create_user(UserName="operator")
    for number, document in enumerate(moto_view(policy)):
        arn = iam.create_policy(
            PolicyName=f"pygirder-operator-{number}", PolicyDocument=json.dumps(document)
        )["Policy"]["Arn"]
        iam.attach_user_policy(UserName="operator", PolicyArn=arn)
    key = iam.create_access_key(UserName="operator")["AccessKey"]
    return {
        "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
    }


def as_operator(monkeypatch: pytest.MonkeyPatch, keys: dict[str, str]) -> None:
    for name, value in keys.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)


@pytest.mark.slow
def test_the_operator_policy_is_enough_for_setup_status_and_teardown(
    aws, make_aws, config, boto, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = operator_keys(boto, operator_policy())
    with monkeypatch.context() as mp, iam_enforced(aws.url):
        as_operator(mp, keys)
        aws_, faults, _ = make_aws(config)
        assert os.environ["AWS_ACCESS_KEY_ID"] == keys["AWS_ACCESS_KEY_ID"]
        setup(config, aws=aws_)
        report = status(config, aws=aws_)
        assert not [i for i in report.items if i.state in ("missing", "not ours")]
        with pytest.raises(AccessDeniedError):  # and nothing beyond the policy
            aws_.call("ec2", "create_vpc_peering_connection", VpcId="vpc-1", PeerVpcId="vpc-2")
    # Outside the block moto no longer enforces IAM and the test credentials are back.
    assert counts(inventory(boto)) == EXPECTED_AFTER_SETUP
    with monkeypatch.context() as mp, iam_enforced(aws.url):
        as_operator(mp, keys)
        aws_, _, _ = make_aws(config)
        assert teardown(config, aws=aws_).ok
    assert sum(counts(inventory(boto)).values()) == 0
    assert len(faults.calls) > 100


@pytest.mark.slow
def test_a_missing_permission_is_named(aws, make_aws, config, boto, monkeypatch) -> None:
    policy = operator_policy()
    for statement in policy["Statement"]:
        statement["Action"] = [a for a in statement["Action"] if a != "ec2:CreateVpc"]
    keys = operator_keys(boto, policy)
    with monkeypatch.context() as mp, iam_enforced(aws.url):
        as_operator(mp, keys)
        aws_, _, _ = make_aws(config)
        with pytest.raises(AccessDeniedError) as info:
            setup(config, aws=aws_)
    assert info.value.action == "ec2:CreateVpc"
    assert "pygirder cloud policy" in str(info.value)
