"""The boto3 adaptor: what is retried, and the errors a user meets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from pygirder.cloud.aws import (
    AccessDeniedError,
    Aws,
    CloudError,
    CredentialsError,
    QuotaExceededError,
    is_transient,
)
from pygirder.errors import PygirderError


def test_calls_reach_moto_through_aws_endpoint_url(make_aws, config) -> None:
    aws, faults, _ = make_aws(config)
    assert aws.account_id == "123456789012"
    vpc = aws.call("ec2", "create_vpc", CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    assert vpc.startswith("vpc-")
    assert faults.calls == ["sts.GetCallerIdentity", "ec2.CreateVpc"]


@pytest.mark.parametrize("code", ["Throttling", "RequestLimitExceeded", "SlowDown"])
def test_throttling_is_retried_with_growing_backoff(make_aws, config, code: str) -> None:
    aws, faults, sleeps = make_aws(config)
    faults.fail("ec2.DescribeVpcs", code, times=3)
    assert aws.call("ec2", "describe_vpcs")["Vpcs"] is not None
    assert faults.calls.count("ec2.DescribeVpcs") == 4
    assert len(sleeps) == 3
    # Capped exponential with half jitter: attempt n sleeps in [d/2, d], d = 0.5 * 2^(n-1).
    for attempt, delay in enumerate(sleeps, start=1):
        full = 0.5 * 2 ** (attempt - 1)
        assert full / 2 <= delay <= full


def test_server_errors_are_retried_then_reported(make_aws, config) -> None:
    aws, faults, sleeps = make_aws(config, max_attempts=3)
    faults.fail("ec2.DescribeVpcs", "InternalError", status=500, times=5)
    with pytest.raises(CloudError) as info:
        aws.call("ec2", "describe_vpcs")
    assert info.value.code == "InternalError"
    assert "ec2:DescribeVpcs failed" in str(info.value)
    assert faults.calls.count("ec2.DescribeVpcs") == 3
    assert len(sleeps) == 2


def test_other_errors_are_not_retried(make_aws, config) -> None:
    aws, faults, sleeps = make_aws(config)
    faults.fail("ec2.CreateVpc", "InvalidParameterValue")
    with pytest.raises(CloudError) as info:
        aws.call("ec2", "create_vpc", CidrBlock="10.9.0.0/16")
    assert info.value.code == "InvalidParameterValue"
    assert faults.calls.count("ec2.CreateVpc") == 1
    assert sleeps == []


def test_real_not_found_errors_from_moto_can_be_ignored(make_aws, config) -> None:
    aws, _, _ = make_aws(config)
    assert aws.call("iam", "get_role", RoleName="nope", ignore=("NoSuchEntity",)) is None
    with pytest.raises(CloudError) as info:
        aws.call("iam", "get_role", RoleName="nope")
    assert info.value.code == "NoSuchEntity"


def test_access_denied_names_the_missing_permission_and_the_fix(make_aws, config) -> None:
    aws, faults, _ = make_aws(config)
    faults.fail(
        "ec2.CreateVpc",
        "UnauthorizedOperation",
        status=403,
        message="You are not authorized to perform this operation. "
        "Encoded authorization failure message: AbC123",
    )
    with pytest.raises(AccessDeniedError) as info:
        aws.call("ec2", "create_vpc", CidrBlock="10.9.0.0/16")
    message = str(info.value)
    assert info.value.action == "ec2:CreateVpc"
    assert "missing the permission ec2:CreateVpc" in message
    assert "pygirder cloud policy" in message
    assert "decode-authorization-message" in message
    assert "AbC123" not in message  # the encoded blob is noise


def test_access_denied_uses_the_action_aws_names(make_aws, config) -> None:
    aws, faults, _ = make_aws(config)
    faults.fail(
        "s3.PutBucketEncryption",
        "AccessDenied",
        status=403,
        message="User: arn:aws:iam::123456789012:user/op is not authorized to perform: "
        "s3:PutEncryptionConfiguration on resource: arn:aws:s3:::b",
    )
    with pytest.raises(AccessDeniedError) as info:
        aws.call(
            "s3",
            "put_bucket_encryption",
            Bucket="b",
            ServerSideEncryptionConfiguration={
                "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
            },
        )
    assert info.value.action == "s3:PutEncryptionConfiguration"


def test_an_expired_token_says_how_to_refresh_it(make_aws, config) -> None:
    aws, faults, _ = make_aws(config)
    faults.fail("sts.GetCallerIdentity", "ExpiredToken", status=400)
    with pytest.raises(CredentialsError) as info:
        aws.account_id  # noqa: B018
    assert "expired" in str(info.value)
    assert "aws sso login" in str(info.value)


def test_rejected_credentials_are_explained(make_aws, config) -> None:
    aws, faults, _ = make_aws(config)
    faults.fail("sts.GetCallerIdentity", "InvalidClientTokenId", status=403)
    with pytest.raises(CredentialsError, match="aws sts get-caller-identity"):
        aws.account_id  # noqa: B018


def test_no_credentials_at_all(aws, config, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(CredentialsError) as info:
        Aws(config).account_id  # noqa: B018
    message = str(info.value)
    assert "no AWS credentials found" in message
    assert "aws configure" in message and "never stores keys" in message


def test_an_unknown_profile_is_explained(aws, make_config) -> None:
    config = make_config(profile="ghost")
    with pytest.raises(CredentialsError) as info:
        Aws(config).account_id  # noqa: B018
    assert "'ghost'" in str(info.value)
    assert "aws configure" in str(info.value)


@pytest.mark.parametrize(
    ("code", "operation"),
    [
        ("VpcLimitExceeded", "ec2.CreateVpc"),
        ("TooManyBuckets", "s3.CreateBucket"),
        ("LimitExceeded", "iam.CreateRole"),
    ],
)
def test_quotas_point_at_service_quotas(make_aws, config, code: str, operation: str) -> None:
    aws, faults, sleeps = make_aws(config)
    faults.fail(operation, code)
    service = operation.split(".")[0]
    params = {
        "ec2.CreateVpc": ("create_vpc", {"CidrBlock": "10.9.0.0/16"}),
        "s3.CreateBucket": ("create_bucket", {"Bucket": "pygirder-quota"}),
        "iam.CreateRole": ("create_role", {"RoleName": "r", "AssumeRolePolicyDocument": "{}"}),
    }[operation]
    with pytest.raises(QuotaExceededError) as info:
        aws.call(service, params[0], **params[1])
    assert "servicequotas" in str(info.value)
    assert sleeps == []  # a quota is not throttling


def test_request_limit_exceeded_is_throttling_not_a_quota() -> None:
    assert is_transient("RequestLimitExceeded", 503)
    assert is_transient("RequestLimitExceeded", 400)
    assert not is_transient("VpcLimitExceeded", 400)


def test_an_unreachable_endpoint_is_explained(aws, config, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(CloudError) as info:
        Aws(config).call("ec2", "describe_vpcs")
    assert "cannot reach the AWS endpoint" in str(info.value)
    assert "AWS_ENDPOINT_URL" in str(info.value)


def test_waits_are_bounded_and_say_what_they_waited_for(make_aws, config) -> None:
    aws, _, sleeps = make_aws(config)
    with pytest.raises(TimeoutError) as info:
        aws.wait_for(lambda: None, what="the moon", timeout=10, interval=2)
    assert "the moon" in str(info.value)
    assert isinstance(info.value, PygirderError)
    assert sleeps == [2, 2, 2, 2]
    assert aws.wait_for(lambda: "ready", what="x", timeout=10, interval=2) == "ready"


def test_the_cli_and_config_import_without_boto3(tmp_path) -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["boto3"] = None      # make `import boto3` fail
        sys.modules["botocore"] = None
        from typer.testing import CliRunner
        from pygirder.cloud.cli import app
        import pygirder.cloud.account, pygirder.cloud.aws, pygirder.cloud.config
        runner = CliRunner()
        assert runner.invoke(app, ["--help"]).exit_code == 0
        result = runner.invoke(app, ["policy"])
        assert result.exit_code == 0, result.output
        assert '"Version": "2012-10-17"' in result.output
        from pygirder.cloud.aws import require_boto3, CloudDependencyError
        try:
            require_boto3()
        except CloudDependencyError as exc:
            assert "pip install 'pygirder[cloud]'" in str(exc)
        else:
            raise AssertionError("boto3 should be missing")
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["PYGIRDER_CONFIG"] = str(tmp_path / "absent.toml")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
