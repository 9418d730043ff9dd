"""plan / setup / status / teardown against moto in server mode, over real HTTP.

What exists is always checked with independent boto3 queries (``boto``), never with
pygirder's own discovery.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cloud_helpers import (
    ACCOUNT,
    EXPECTED_AFTER_SETUP,
    OTHER_PUBLIC_KEY,
    PUBLIC_KEY,
    SSH_FROM,
    counts,
    inventory,
    tag_filter,
)

from pygirder.cloud.account import (
    Action,
    account_resources,
    plan,
    setup,
    start_nat,
    status,
    stop_nat,
    teardown,
)
from pygirder.cloud.config import config_from_dict
from pygirder.cloud.errors import (
    AccessDeniedError,
    CloudConfigError,
    CloudTimeoutError,
    FleetAliveError,
    NotSetUpError,
    ResourceConflictError,
)
from pygirder.cloud.fleet.access import _ssh_base
from pygirder.cloud.policy import boundary_arn, boundary_policy
from pygirder.cloud.tags import TAG_COMPONENT, TAG_FLEET, TAG_MANAGED, TAG_NAME


def actions(report) -> dict[str, str]:
    return {item.key: item.action.value for item in report.items}


@pytest.fixture
def done(make_aws, config):
    """An account after one successful setup: (config, aws, faults, sleeps, report)."""
    aws_, faults, sleeps = make_aws(config)
    report = setup(config, aws=aws_)
    return config, aws_, faults, sleeps, report


# ------------------------------------------------------------------- setup


def test_setup_from_empty_creates_everything_as_configured(done, boto) -> None:
    config, _, _, _, report = done
    assert set(actions(report).values()) == {"create"}
    assert counts(inventory(boto)) == EXPECTED_AFTER_SETUP
    ec2, iam, s3 = boto("ec2"), boto("iam"), boto("s3")
    res = {item.key: item.id for item in report.items}

    # IAM: least privilege, under the /pygirder/ path, profile holding the role.
    role = iam.get_role(RoleName="pygirder-t-instance")["Role"]
    assert role["Path"] == "/pygirder/"
    assert {t["Key"]: t["Value"] for t in role["Tags"]}[TAG_MANAGED] == "true"
    policy = iam.get_role_policy(RoleName="pygirder-t-instance", PolicyName="pygirder-instance")
    actions_granted = sorted(
        a
        for s in policy["PolicyDocument"]["Statement"]
        for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
    )
    assert actions_granted == [
        "s3:DeleteObject",  # results/ only: the durable result store
        "s3:GetObject",
        "s3:GetObject",
        "s3:ListBucket",
        "s3:PutObject",
        "sns:Publish",
        "ssm:GetParameter",
        "ssm:GetParameters",
        "ssm:GetParametersByPath",
    ]
    assert "parameter/pygirder/t/*" in json.dumps(policy["PolicyDocument"])
    profile = iam.get_instance_profile(InstanceProfileName="pygirder-t-instance")
    assert [r["RoleName"] for r in profile["InstanceProfile"]["Roles"]] == ["pygirder-t-instance"]

    # S3: private, encrypted, old artifacts expire, tagged.
    bucket = f"pygirder-t-{ACCOUNT}-us-east-1"
    block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert all(block.values()) and len(block) == 4
    rules = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    rules = {r["Filter"]["Prefix"]: r for r in s3.get_bucket_lifecycle_configuration(
        Bucket=bucket)["Rules"]}  # fmt: skip
    assert set(rules) == {"artifacts/", "results/"}  # durable results expire too
    assert rules["artifacts/"]["Expiration"] == {"Days": 30}
    assert rules["results/"]["Expiration"] == {"Days": 30}
    tags = {t["Key"]: t["Value"] for t in s3.get_bucket_tagging(Bucket=bucket)["TagSet"]}
    assert tags[TAG_NAME] == "t" and tags[TAG_COMPONENT] == "bucket"

    # SNS -> SQS: only the status topic may send, raw delivery.
    queue_url = boto("sqs").get_queue_url(QueueName="pygirder-t-status")["QueueUrl"]
    attrs = boto("sqs").get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])[
        "Attributes"
    ]
    (statement,) = json.loads(attrs["Policy"])["Statement"]
    topic_arn = f"arn:aws:sns:us-east-1:{ACCOUNT}:pygirder-t-status"
    assert statement["Condition"] == {"ArnEquals": {"aws:SourceArn": topic_arn}}
    assert statement["Principal"] == {"Service": "sns.amazonaws.com"}
    assert attrs["SqsManagedSseEnabled"] == "true"
    (sub,) = boto("sns").list_subscriptions_by_topic(TopicArn=topic_arn)["Subscriptions"]
    assert sub["Endpoint"] == attrs["QueueArn"]
    sub_attrs = boto("sns").get_subscription_attributes(SubscriptionArn=sub["SubscriptionArn"])
    assert sub_attrs["Attributes"]["RawMessageDelivery"] == "true"

    # Keys: the user's public key imported; the cluster key saved 0600.
    user = ec2.describe_key_pairs(KeyNames=["pygirder-t-user"], IncludePublicKey=True)
    assert user["KeyPairs"][0]["PublicKey"].split()[:2] == PUBLIC_KEY.split()[:2]
    key_file = config.cluster_key_path
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert "PRIVATE KEY" in key_file.read_text()

    # Network: public IPs only in the public subnet, routes, endpoint, SG.
    subnets = {
        {t["Key"]: t["Value"] for t in s["Tags"]}[TAG_COMPONENT]: s
        for s in ec2.describe_subnets(Filters=tag_filter())["Subnets"]
    }
    assert subnets["public-subnet"]["MapPublicIpOnLaunch"] is True
    assert subnets["private-subnet"]["MapPublicIpOnLaunch"] is False
    assert {s["AvailabilityZone"] for s in subnets.values()} == {"us-east-1a"}
    assert subnets["public-subnet"]["CidrBlock"] == "10.42.0.0/20"
    igw = ec2.describe_internet_gateways(InternetGatewayIds=[res["internet-gateway"]])
    assert igw["InternetGateways"][0]["Attachments"][0]["VpcId"] == res["vpc"]
    tables = {
        t["RouteTableId"]: t for t in ec2.describe_route_tables(Filters=tag_filter())["RouteTables"]
    }
    public_default = next(
        r
        for r in tables[res["public-routes"]]["Routes"]
        if r.get("DestinationCidrBlock") == "0.0.0.0/0"
    )
    assert public_default["GatewayId"] == res["internet-gateway"]
    private_default = next(
        r
        for r in tables[res["private-routes"]]["Routes"]
        if r.get("DestinationCidrBlock") == "0.0.0.0/0"
    )
    nat = ec2.describe_instances(InstanceIds=[res["nat-instance"]])["Reservations"][0]["Instances"][
        0
    ]
    assert (
        private_default["NetworkInterfaceId"] == nat["NetworkInterfaces"][0]["NetworkInterfaceId"]
    )
    assert [a["SubnetId"] for a in tables[res["private-routes"]]["Associations"]] == [
        subnets["private-subnet"]["SubnetId"]
    ]
    (endpoint,) = ec2.describe_vpc_endpoints(Filters=tag_filter())["VpcEndpoints"]
    assert endpoint["ServiceName"] == "com.amazonaws.us-east-1.s3"
    assert endpoint["VpcEndpointType"] == "Gateway"
    assert sorted(endpoint["RouteTableIds"]) == sorted(
        [res["public-routes"], res["private-routes"]]
    )
    group = ec2.describe_security_groups(GroupIds=[res["cluster-sg"]])["SecurityGroups"][0]
    ingress = {
        (p["IpProtocol"], p.get("FromPort"), src)
        for p in group["IpPermissions"]
        for src in [r["CidrIp"] for r in p["IpRanges"]]
        + [g["GroupId"] for g in p["UserIdGroupPairs"]]
    }
    assert ingress == {("tcp", 22, SSH_FROM), ("-1", None, res["cluster-sg"])}

    # NAT instance: created stopped, forwarding enabled, IMDSv2 only, named.
    assert nat["State"]["Name"] == "stopped"
    assert nat["SourceDestCheck"] is False
    assert nat["SubnetId"] == subnets["public-subnet"]["SubnetId"]
    assert nat["MetadataOptions"]["HttpTokens"] == "required"
    nat_tags = {t["Key"]: t["Value"] for t in nat["Tags"]}
    assert nat_tags["Name"] == "pygirder-t-nat" and nat_tags[TAG_MANAGED] == "true"

    # Billing: alarms in us-east-1 on EstimatedCharges -> billing topic; budget.
    alarms = boto("cloudwatch").describe_alarms(AlarmNamePrefix="pygirder-t-")["MetricAlarms"]
    billing_topic = f"arn:aws:sns:us-east-1:{ACCOUNT}:pygirder-t-billing"
    assert sorted(a["Threshold"] for a in alarms) == [1.0, 10.0, 100.0]
    for alarm in alarms:
        assert alarm["MetricName"] == "EstimatedCharges"
        assert alarm["Namespace"] == "AWS/Billing"
        assert alarm["AlarmActions"] == [billing_topic]
    email = boto("sns").list_subscriptions_by_topic(TopicArn=billing_topic)["Subscriptions"]
    assert [(s["Protocol"], s["Endpoint"]) for s in email] == [("email", "ops@example.com")]
    budget = boto("budgets").describe_budget(AccountId=ACCOUNT, BudgetName="pygirder-t-budget")
    assert float(budget["Budget"]["BudgetLimit"]["Amount"]) == 25.0
    notes = boto("budgets").describe_notifications_for_budget(
        AccountId=ACCOUNT, BudgetName="pygirder-t-budget"
    )["Notifications"]
    assert {(n["NotificationType"], n["Threshold"]) for n in notes} == {
        ("ACTUAL", 80.0),
        ("ACTUAL", 100.0),
        ("FORECASTED", 100.0),
    }


def test_the_status_topic_delivers_to_the_status_queue(done, boto) -> None:
    resources = account_resources(done[0], aws=done[1])
    boto("sns").publish(TopicArn=resources["topic_arn"], Message='{"instance": "i-1"}')
    got = boto("sqs").receive_message(QueueUrl=resources["queue_url"], WaitTimeSeconds=2)
    assert [m["Body"] for m in got["Messages"]] == ['{"instance": "i-1"}']  # raw delivery


def test_setup_twice_changes_nothing_and_duplicates_nothing(done, make_aws, boto) -> None:
    config = done[0]
    before = inventory(boto)
    aws_, faults, _ = make_aws(config)
    again = setup(config, aws=aws_)
    assert set(actions(again).values()) == {"ok"}
    assert again.changes == []
    assert inventory(boto) == before
    mutating = [
        c
        for c in faults.calls
        if c.split(".")[1].startswith(("Create", "Put", "Run", "Import", "Authorize", "Subscribe"))
    ]
    assert mutating == []  # a true no-op: nothing was even re-applied


def test_plan_changes_nothing(make_aws, config, boto) -> None:
    aws_, faults, _ = make_aws(config)
    report = plan(config, aws=aws_)
    assert set(actions(report).values()) == {"create"}
    assert len(report.items) == 25  # with the account's permissions boundary
    assert all(
        c.split(".")[1].startswith(("Get", "Describe", "List", "Head")) for c in faults.calls
    )
    assert sum(counts(inventory(boto)).values()) == 0


def test_plan_after_a_partial_setup_then_setup_finishes_it(make_aws, config, boto) -> None:
    aws_, faults, _ = make_aws(config)
    faults.fail("ec2.RunInstances", "UnauthorizedOperation", status=403)
    with pytest.raises(AccessDeniedError) as info:
        setup(config, aws=aws_)
    assert info.value.action == "ec2:RunInstances"

    partial = actions(plan(config, aws=aws_))
    keys = list(partial)
    nat = keys.index("nat-instance")
    assert all(partial[k] == "ok" for k in keys[:nat])
    assert all(partial[k] == "create" for k in keys[nat:])

    boto("s3").delete_bucket(Bucket=f"pygirder-t-{ACCOUNT}-us-east-1")  # deleted by hand
    assert actions(plan(config, aws=aws_))["bucket"] == "create"

    finished = setup(config, aws=aws_)
    assert {i.key for i in finished.changes} == {"bucket", *keys[nat:]}
    assert counts(inventory(boto)) == EXPECTED_AFTER_SETUP
    assert {i.action for i in plan(config, aws=aws_).items} == {Action.NONE}


def test_drift_is_planned_and_fixed(done, make_config, make_aws, boto) -> None:
    bucket = f"pygirder-t-{ACCOUNT}-us-east-1"
    boto("s3").delete_public_access_block(Bucket=bucket)
    moved = make_config(ssh_from="192.0.2.0/24")  # the operator's address changed
    aws2, _, _ = make_aws(moved)
    report = plan(moved, aws=aws2)
    changed = {i.key: i.detail for i in report.changes}
    assert set(changed) == {"bucket", "cluster-sg"}
    assert "public access not fully blocked" in changed["bucket"]
    assert "missing ingress tcp/22 from 192.0.2.0/24" in changed["cluster-sg"]
    assert f"unexpected ingress tcp/22 from {SSH_FROM}" in changed["cluster-sg"]

    setup(moved, aws=aws2)
    group_id = account_resources(moved, aws=aws2)["security_group_id"]
    perms = boto("ec2").describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
    ssh = [
        r["CidrIp"]
        for p in perms["IpPermissions"]
        if p.get("FromPort") == 22
        for r in p["IpRanges"]
    ]
    assert ssh == ["192.0.2.0/24"]
    assert all(
        boto("s3").get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"].values()
    )
    assert plan(moved, aws=aws2).changes == []


def test_the_instance_role_carries_the_permissions_boundary(done, boto) -> None:
    iam = boto("iam")
    arn = boundary_arn("aws", ACCOUNT)
    role = iam.get_role(RoleName="pygirder-t-instance")["Role"]
    assert role["PermissionsBoundary"]["PermissionsBoundaryArn"] == arn
    policy = iam.get_policy(PolicyArn=arn)["Policy"]
    assert policy["Path"] == "/pygirder/"
    version = iam.get_policy_version(PolicyArn=arn, VersionId=policy["DefaultVersionId"])
    assert version["PolicyVersion"]["Document"] == boundary_policy()


def test_a_role_without_the_boundary_gets_it_and_trust_drift_recreates_the_role(
    done, make_aws, boto
) -> None:
    config, _, _, _, _ = done
    iam = boto("iam")
    iam.delete_role_permissions_boundary(RoleName="pygirder-t-instance")
    aws2, faults, _ = make_aws(config)
    assert "permissions boundary missing" in actions_detail(plan(config, aws=aws2))["role"]
    setup(config, aws=aws2)
    role = iam.get_role(RoleName="pygirder-t-instance")["Role"]
    assert role["PermissionsBoundary"]["PermissionsBoundaryArn"] == boundary_arn("aws", ACCOUNT)

    lax = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}],
    }
    iam.update_assume_role_policy(RoleName="pygirder-t-instance", PolicyDocument=json.dumps(lax))
    aws3, faults, _ = make_aws(config)
    setup(config, aws=aws3)
    assert not [c for c in faults.calls if "UpdateAssumeRolePolicy" in c]
    assert "iam.DeleteRole" in faults.calls and "iam.CreateRole" in faults.calls
    role = iam.get_role(RoleName="pygirder-t-instance")["Role"]
    principal = role["AssumeRolePolicyDocument"]["Statement"][0]["Principal"]
    assert principal == {"Service": "ec2.amazonaws.com"}
    assert role["PermissionsBoundary"]["PermissionsBoundaryArn"] == boundary_arn("aws", ACCOUNT)
    profile = iam.get_instance_profile(InstanceProfileName="pygirder-t-instance")
    assert [r["RoleName"] for r in profile["InstanceProfile"]["Roles"]] == ["pygirder-t-instance"]
    assert plan(config, aws=aws3).changes == []


def test_a_changed_boundary_stops_setup_and_teardown_keeps_it(done, make_aws, boto) -> None:
    config, _, _, _, _ = done
    iam = boto("iam")
    arn = boundary_arn("aws", ACCOUNT)
    wider = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
    }
    iam.create_policy_version(PolicyArn=arn, PolicyDocument=json.dumps(wider), SetAsDefault=True)
    aws2, faults, _ = make_aws(config)
    with pytest.raises(ResourceConflictError) as info:
        setup(config, aws=aws2)
    assert "create-policy-version" in str(info.value) and arn in str(info.value)
    assert not [c for c in faults.calls if "PolicyVersion" in c and "Get" not in c]

    assert teardown(config, aws=aws2).ok
    assert iam.get_policy(PolicyArn=arn)["Policy"]["PolicyName"] == "pygirder-boundary"


def actions_detail(report) -> dict[str, str]:
    return {item.key: item.detail for item in report.items}


def test_changed_alarms_budget_and_keys_converge(
    done, make_config, make_aws, boto, tmp_path
) -> None:
    config = done[0]
    (tmp_path / "new.pub").write_text(OTHER_PUBLIC_KEY)
    config.cluster_key_path.unlink()  # e.g. set up from another machine
    changed = make_config(
        alarm_thresholds_usd=[5, 50], budget_usd=40, public_key_file=str(tmp_path / "new.pub")
    )
    aws_, _, _ = make_aws(changed)
    planned = {i.key: i.action.value for i in plan(changed, aws=aws_).changes}
    assert planned == {
        "user-key": "replace",
        "cluster-key": "replace",
        "billing-alarm-5": "create",
        "billing-alarm-50": "create",
        "old-billing-alarms": "delete",
        "budget": "replace",
    }
    report = setup(changed, aws=aws_)
    assert [i.action for i in report.items if i.key == "old-billing-alarms"] == [Action.DELETE] * 3
    alarms = boto("cloudwatch").describe_alarms(AlarmNamePrefix="pygirder-t-")["MetricAlarms"]
    assert sorted(a["Threshold"] for a in alarms) == [5.0, 50.0]
    budget = boto("budgets").describe_budget(AccountId=ACCOUNT, BudgetName="pygirder-t-budget")
    assert float(budget["Budget"]["BudgetLimit"]["Amount"]) == 40.0
    user = boto("ec2").describe_key_pairs(KeyNames=["pygirder-t-user"], IncludePublicKey=True)
    assert user["KeyPairs"][0]["PublicKey"].split()[:2] == OTHER_PUBLIC_KEY.split()[:2]
    assert stat.S_IMODE(changed.cluster_key_path.stat().st_mode) == 0o600
    assert plan(changed, aws=aws_).changes == []


@pytest.mark.slow
def test_switching_between_nat_instance_and_gateway(done, make_config, make_aws, boto) -> None:
    gateway = make_config(nat="gateway")
    aws_, _, _ = make_aws(gateway)
    planned = {i.key: i.action.value for i in plan(gateway, aws=aws_).changes}
    assert planned == {
        "nat-sg": "delete",
        "nat-instance": "delete",
        "nat-address": "create",
        "nat-gateway": "create",
        "private-routes": "update",
    }
    setup(gateway, aws=aws_)
    inv = inventory(boto)
    assert (len(inv["nat_gateways"]), len(inv["addresses"]), len(inv["instances"])) == (1, 1, 0)
    resources = account_resources(gateway, aws=aws_)
    assert resources["nat_gateway_id"] == inv["nat_gateways"][0]
    assert resources["nat_instance_id"] is None
    tables = boto("ec2").describe_route_tables(Filters=tag_filter())["RouteTables"]
    nat_routes = [r for t in tables for r in t["Routes"] if r.get("NatGatewayId")]
    assert [r["NatGatewayId"] for r in nat_routes] == inv["nat_gateways"]

    costs = {i.key: i.monthly_usd for i in status(gateway, aws=aws_).items}
    assert costs["nat-gateway"] == pytest.approx(32.85)
    assert costs["nat-address"] == pytest.approx(3.65)

    back = setup(done[0], aws=make_aws(done[0])[0])
    assert {i.key for i in back.changes} >= {"nat-instance", "nat-gateway", "nat-address"}
    inv = inventory(boto)
    assert (len(inv["nat_gateways"]), len(inv["addresses"]), len(inv["instances"])) == (0, 0, 1)


# --------------------------------------------------------------- conflicts


def test_names_held_by_others_stop_setup_before_anything_changes(make_aws, config, boto) -> None:
    boto("iam").create_role(RoleName="pygirder-t-instance", AssumeRolePolicyDocument="{}")
    boto("sqs").create_queue(QueueName="pygirder-t-status")
    aws_, faults, _ = make_aws(config)
    report = plan(config, aws=aws_)
    assert {i.key for i in report.conflicts} == {"role", "status-queue"}
    assert "not created by pygirder" in report.conflicts[0].detail

    with pytest.raises(ResourceConflictError) as info:
        setup(config, aws=aws_)
    assert {i.key for i in info.value.items} == {"role", "status-queue"}
    assert "setup stopped before changing anything" in str(info.value)
    assert not any(".Create" in c or ".Put" in c for c in faults.calls)

    teardown(config, aws=aws_)  # never deletes what pygirder did not create
    assert boto("iam").get_role(RoleName="pygirder-t-instance")["Role"]
    assert boto("sqs").get_queue_url(QueueName="pygirder-t-status")["QueueUrl"]
    role = next(i for i in status(config, aws=aws_).items if i.key == "role")
    assert role.state == "not ours"


def test_a_bucket_name_taken_by_another_account(make_aws, config) -> None:
    aws_, faults, _ = make_aws(config)
    faults.fail("s3.HeadBucket", "403", status=403, times=2)
    (conflict,) = plan(config, aws=aws_).conflicts
    assert conflict.key == "bucket"
    assert "another AWS account" in conflict.detail
    with pytest.raises(ResourceConflictError):
        setup(config, aws=aws_)


def test_duplicates_are_reported_as_a_leak_and_torn_down(done, make_aws, boto) -> None:
    config = done[0]
    tags = [
        {"Key": TAG_MANAGED, "Value": "true"},
        {"Key": TAG_NAME, "Value": "t"},
        {"Key": TAG_COMPONENT, "Value": "vpc"},
    ]
    boto("ec2").create_vpc(
        CidrBlock="10.42.0.0/16", TagSpecifications=[{"ResourceType": "vpc", "Tags": tags}]
    )
    aws_, _, _ = make_aws(config)
    (conflict,) = plan(config, aws=aws_).conflicts
    assert conflict.key == "vpc" and "likely a resource leak" in conflict.detail
    with pytest.raises(ResourceConflictError):
        setup(config, aws=aws_)
    assert teardown(config, aws=aws_).ok
    assert inventory(boto)["vpcs"] == []


def test_a_zone_the_region_lacks_is_refused_with_the_choices(make_aws, make_config, boto) -> None:
    config = make_config(zone="us-east-1z")
    aws_, _, _ = make_aws(config)
    with pytest.raises(CloudConfigError) as info:
        setup(config, aws=aws_)
    assert "us-east-1z" in str(info.value) and "us-east-1a" in str(info.value)
    assert info.value.problems[0][0] == "zone"
    assert sum(counts(inventory(boto)).values()) == 0


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "ssh-keygen -t ed25519"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n", "PRIVATE key"),
        ("hello world\n", "not an OpenSSH public key"),
    ],
)
def test_a_bad_public_key_file_is_explained(
    make_aws, make_config, tmp_path: Path, content: str | None, expected: str
) -> None:
    path = tmp_path / "mine.pub"
    if content is not None:
        path.write_text(content)
    config = make_config(public_key_file=str(path))
    aws_, _, _ = make_aws(config)
    with pytest.raises(CloudConfigError, match=expected):
        setup(config, aws=aws_)
    assert any(expected in w for w in plan(config, aws=aws_).warnings)


def test_without_an_ssh_key_setup_creates_a_pygirder_key_pair(
    make_aws, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, boto
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    config = config_from_dict(
        {"name": "t", "ssh_from": SSH_FROM, "cluster_key_file": str(tmp_path / "c.pem")}
    )
    assert config.uses_pygirder_key  # no ~/.ssh/id_ed25519.pub
    aws_, _, _ = make_aws(config)
    planned = plan(config, aws=aws_)  # plan only says what setup will do
    assert any("will create a pygirder key pair" in w for w in planned.warnings)
    assert not (home / ".pygirder").exists()

    report = setup(config, aws=aws_)
    private = home / ".pygirder" / "keys" / "pygirder-ed25519"
    public = private.with_name("pygirder-ed25519.pub")
    assert any(f"created an SSH key pair for pygirder: {private}" in w for w in report.warnings)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(private.parent.stat().st_mode) == 0o700
    assert private.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    line = public.read_text().strip()
    assert line.startswith("ssh-ed25519 ")
    imported = boto("ec2").describe_key_pairs(KeyNames=["pygirder-t-user"], IncludePublicKey=True)
    assert imported["KeyPairs"][0]["PublicKey"].split()[:2] == line.split()[:2]
    # Fleet SSH uses the private half.
    assert f"-i {private}" in " ".join(_ssh_base(config, "fl-20260101-0000-0123456789abcdef"))

    again = setup(config, aws=aws_)  # the key is kept, nothing changes
    assert public.read_text().strip() == line
    assert not any("created an SSH key pair" in w for w in again.warnings)
    assert again.changes == []


def test_a_public_key_file_that_points_elsewhere_is_used_and_never_created(
    make_aws, make_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = make_config(public_key_file=str(tmp_path / "keys" / "team.pub"))
    assert not config.uses_pygirder_key
    aws_, _, _ = make_aws(config)
    with pytest.raises(CloudConfigError, match=r"team\.pub does not exist"):
        setup(config, aws=aws_)
    assert not (tmp_path / "home" / ".pygirder").exists()
    (tmp_path / "keys" / "team.pub").parent.mkdir(exist_ok=True)
    (tmp_path / "keys" / "team.pub").write_text(PUBLIC_KEY + "\n")
    assert not any("created an SSH key pair" in w for w in setup(config, aws=aws_).warnings)


def test_setup_refuses_without_an_ssh_source(make_aws, make_config) -> None:
    config = make_config(ssh_from="")
    aws_, faults, _ = make_aws(config)
    with pytest.raises(CloudConfigError, match="ssh_from"):
        setup(config, aws=aws_)
    assert faults.calls == []  # refused before any AWS call
    assert any("ssh_from is not set" in w for w in plan(config, aws=aws_).warnings)


# ------------------------------------------------- transient AWS behaviour


def test_throttling_during_setup_is_absorbed(make_aws, config, boto) -> None:
    aws_, faults, sleeps = make_aws(config)
    faults.fail("ec2.CreateVpc", "RequestLimitExceeded", times=2)
    faults.fail("iam.CreateRole", "Throttling", status=400, times=1)
    setup(config, aws=aws_)
    assert faults.injected.count("ec2.CreateVpc:RequestLimitExceeded") == 2
    assert len(sleeps) >= 3
    assert counts(inventory(boto)) == EXPECTED_AFTER_SETUP


def test_instance_profile_propagation_is_waited_for(make_aws, config) -> None:
    aws_, faults, sleeps = make_aws(config)
    faults.fail("iam.AddRoleToInstanceProfile", "NoSuchEntity", status=404, times=2)
    # The first GetInstanceProfile is discovery (really absent); then IAM "forgets"
    # the new profile twice, as a real eventually-consistent read can.
    faults.fail("iam.GetInstanceProfile", "NoSuchEntity", status=404, after=1, times=2)
    faults.fail("iam.PutRolePolicy", "NoSuchEntity", status=404, times=1)
    faults.fail("sqs.CreateQueue", "AWS.SimpleQueueService.QueueDeletedRecently", times=1)
    report = setup(config, aws=aws_)
    assert actions(report)["instance-profile"] == "create"
    assert sleeps.count(3.0) == 5  # profile/role visibility polls
    assert 5.0 in sleeps  # the queue name was released after one poll
    assert account_resources(config, aws=aws_)["instance_profile_arn"].endswith(
        ":instance-profile/pygirder/pygirder-t-instance"
    )


def test_propagation_that_never_happens_times_out_clearly(make_aws, config) -> None:
    aws_, faults, _ = make_aws(config)
    faults.fail("iam.AddRoleToInstanceProfile", "NoSuchEntity", status=404, times=1000)
    with pytest.raises(CloudTimeoutError, match="instance profile pygirder-t-instance"):
        setup(config, aws=aws_)
    planned = {i.key: i.detail for i in plan(config, aws=aws_).changes}
    assert "not the instance role" in planned["instance-profile"]


# ----------------------------------------------------------------- status


def test_status_shows_states_and_the_idle_cost(done, make_aws, boto) -> None:
    config = done[0]
    ec2 = boto("ec2")
    ec2.create_launch_template(
        LaunchTemplateName="pygirder-t-worker",
        LaunchTemplateData={"InstanceType": "t3.micro"},
        TagSpecifications=[
            {
                "ResourceType": "launch-template",
                "Tags": [{"Key": TAG_MANAGED, "Value": "true"}, {"Key": TAG_NAME, "Value": "t"}],
            }
        ],
    )
    boto("cloudwatch").delete_alarms(AlarmNames=["pygirder-t-billing-100usd"])
    aws_, _, _ = make_aws(config)
    report = status(config, aws=aws_)
    items = {i.key: i for i in report.items}
    assert items["nat-instance"].state == "stopped"
    assert items["nat-instance"].monthly_usd == pytest.approx(15 * 0.08)  # its disk only
    assert items["billing-alarm-100"].state == "missing"
    assert items["billing-alarm-1"].monthly_usd == pytest.approx(0.10)
    assert items["launch-templates"].detail.endswith("left over: teardown removes it")
    assert items["bucket"].detail == "0 objects, 0 B"
    assert report.total_monthly_usd == pytest.approx(1.20 + 0.20)
    bucket = items["bucket"].name
    boto("s3").put_object(Bucket=bucket, Key="results/" + "ab" * 20, Body=b"x" * 2_000_000)
    detail = {i.key: i for i in status(config, aws=aws_).items}["bucket"].detail
    assert detail.startswith("1 objects") and "results: 1, " in detail and "/month" in detail
    assert "nat-gateway" not in items  # not wanted, not there: not shown
    json.dumps(report.to_dict())  # the CLI's --json works


def test_the_nat_can_be_started_and_stopped(done, boto) -> None:
    config, aws_, *_ = done
    iid = start_nat(config, aws=aws_)
    state = boto("ec2").describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    assert state["State"]["Name"] == "running"
    running = {i.key: i for i in status(config, aws=aws_).items}["nat-instance"]
    # compute + its public IPv4 address + its disk
    assert running.monthly_usd == pytest.approx((0.0042 + 0.005) * 730 + 1.20, abs=0.01)
    assert stop_nat(config, aws=aws_) == iid
    state = boto("ec2").describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    assert state["State"]["Name"] in ("stopping", "stopped")


# ------------------------------------------------------- account_resources


def test_account_resources_for_the_fleet_code(done, boto) -> None:
    config, aws_, *_ = done
    res = account_resources(config, aws=aws_)
    assert res["bucket"] == f"pygirder-t-{ACCOUNT}-us-east-1"
    assert res["topic_arn"] == f"arn:aws:sns:us-east-1:{ACCOUNT}:pygirder-t-status"
    assert res["queue_arn"] == f"arn:aws:sqs:us-east-1:{ACCOUNT}:pygirder-t-status"
    assert res["queue_url"].endswith("/pygirder-t-status")
    assert res["role_name"] == "pygirder-t-instance"
    assert res["instance_profile_name"] == "pygirder-t-instance"
    assert res["key_name"] == "pygirder-t-user"
    assert res["cluster_key_name"] == "pygirder-t-cluster"
    assert res["cluster_key_file"] == str(config.cluster_key_path)
    assert res["ssm_prefix"] == "/pygirder/t/"
    inv = inventory(boto)
    assert res["vpc_id"] == inv["vpcs"][0]
    assert sorted(res["subnet_ids"].values()) == sorted(inv["subnets"])
    assert res["nat_instance_id"] == inv["instances"][0]
    assert res["nat_gateway_id"] is None
    assert res["security_group_id"] in inv["security_groups"]
    assert all(v is not None for k, v in res.items() if k != "nat_gateway_id")


def test_account_resources_before_setup(make_aws, config) -> None:
    aws_, _, _ = make_aws(config)
    with pytest.raises(NotSetUpError) as info:
        account_resources(config, aws=aws_)
    assert "pygirder cloud setup" in str(info.value)
    assert "vpc" in info.value.missing and "bucket" in info.value.missing
    loose = account_resources(config, aws=aws_, strict=False)
    assert loose["vpc_id"] is None and loose["account_id"] == ACCOUNT


# ---------------------------------------------------------------- teardown


def _leftovers(boto, subnet: str) -> None:
    """What fleet and image commands leave behind, tagged for setup "t"."""
    tags = [{"Key": TAG_MANAGED, "Value": "true"}, {"Key": TAG_NAME, "Value": "t"}]
    ec2 = boto("ec2")
    ec2.create_launch_template(
        LaunchTemplateName="pygirder-t-worker",
        LaunchTemplateData={"InstanceType": "t3.micro"},
        TagSpecifications=[{"ResourceType": "launch-template", "Tags": tags}],
    )
    ec2.create_volume(
        AvailabilityZone="us-east-1a",
        Size=1,
        TagSpecifications=[{"ResourceType": "volume", "Tags": tags}],
    )
    ec2.run_instances(
        ImageId="ami-12c6146b",
        MinCount=1,
        MaxCount=1,
        SubnetId=subnet,
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [*tags, {"Key": "pygirder:role", "Value": "image-builder"}],
            }
        ],
    )
    boto("ssm").put_parameter(Name="/pygirder/t/fleet/abc", Value="{}", Type="String", Tags=tags)
    bucket = f"pygirder-t-{ACCOUNT}-us-east-1"
    for i in range(3):
        boto("s3").put_object(Bucket=bucket, Key=f"artifacts/{i}.whl", Body=b"x" * 100)


@pytest.mark.slow
def test_teardown_deletes_everything_and_proves_it(done, make_aws, boto) -> None:
    config = done[0]
    res = account_resources(config, aws=done[1])
    _leftovers(boto, res["private_subnet_id"])
    assert any(counts(inventory(boto)).values())
    aws_, _, _ = make_aws(config)
    report = teardown(config, aws=aws_)
    assert report.ok and report.remaining == [] and report.failures == []
    deleted = {i.key for i in report.items}
    assert {"vpc", "bucket", "role", "budget", "launch-templates", "volumes"} <= deleted
    assert {"instances", "ssm-parameters"} <= deleted
    # Independent proof: nothing of setup "t" is left anywhere.
    assert counts(inventory(boto)) == dict.fromkeys(EXPECTED_AFTER_SETUP, 0)
    assert boto("iam").list_roles(PathPrefix="/pygirder/")["Roles"] == []
    assert boto("sns", "us-east-1").list_topics()["Topics"] == []
    assert not config.cluster_key_path.exists()
    tagged = boto("resourcegroupstaggingapi").get_resources(
        TagFilters=[{"Key": TAG_NAME, "Values": ["t"]}]
    )["ResourceTagMappingList"]
    live = [m["ResourceARN"] for m in tagged if ":instance/" not in m["ResourceARN"]]
    assert live == []
    # And again: an empty account tears down to nothing, successfully.
    again = teardown(config, aws=aws_)
    assert again.items == [] and again.ok


def test_teardown_refuses_while_a_fleet_is_alive(done, make_aws, boto) -> None:
    config = done[0]
    subnet = account_resources(config, aws=done[1])["private_subnet_id"]
    tags = [
        {"Key": TAG_MANAGED, "Value": "true"},
        {"Key": TAG_NAME, "Value": "t"},
        {"Key": TAG_FLEET, "Value": "f-1"},
        {"Key": "pygirder:role", "Value": "worker"},
    ]
    ids = [
        i["InstanceId"]
        for i in boto("ec2").run_instances(
            ImageId="ami-12c6146b",
            MinCount=2,
            MaxCount=2,
            SubnetId=subnet,
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
        )["Instances"]
    ]
    before = inventory(boto)
    aws_, faults, _ = make_aws(config)
    with pytest.raises(FleetAliveError) as info:
        teardown(config, aws=aws_)
    assert sorted(info.value.instance_ids) == sorted(ids)
    assert "pygirder cloud down" in str(info.value) and "--force" in str(info.value)
    assert inventory(boto) == before  # nothing was touched
    assert not any(".Delete" in c or ".Terminate" in c for c in faults.calls)

    forced = teardown(config, aws=aws_, force=True)
    assert forced.ok
    states = {
        i["InstanceId"]: i["State"]["Name"]
        for r in boto("ec2").describe_instances(InstanceIds=ids)["Reservations"]
        for i in r["Instances"]
    }
    assert set(states.values()) == {"terminated"}


def test_teardown_retries_dependency_violations(done, make_aws, boto) -> None:
    config = done[0]
    aws_, faults, sleeps = make_aws(config)
    faults.fail("ec2.DeleteVpc", "DependencyViolation", times=2)
    faults.fail("ec2.DeleteSubnet", "DependencyViolation", times=1)
    faults.fail("iam.DeleteRole", "DeleteConflict", status=409, times=1)
    report = teardown(config, aws=aws_)
    assert report.ok
    assert faults.injected.count("ec2.DeleteVpc:DependencyViolation") == 2
    assert faults.calls.count("ec2.DeleteVpc") == 3
    assert sleeps.count(2.0) == 3 and sleeps.count(4.0) == 1  # 2, 4 / 2 / 2
    assert counts(inventory(boto)) == dict.fromkeys(EXPECTED_AFTER_SETUP, 0)


@pytest.mark.slow
def test_a_failed_deletion_is_reported_and_the_rest_still_goes(done, make_aws, boto) -> None:
    config = done[0]
    aws_, faults, sleeps = make_aws(config)
    faults.fail("ec2.DeleteSecurityGroup", "UnauthorizedOperation", status=403)
    faults.fail("ec2.DeleteVpc", "DependencyViolation", times=50)
    report = teardown(config, aws=aws_)
    assert not report.ok
    failed = {i.key: i.detail for i in report.failures}
    assert set(failed) == {"nat-sg", "vpc"}
    assert "ec2:DeleteSecurityGroup" in failed["nat-sg"]
    assert sleeps == []  # after a failure, no waiting on doomed dependencies
    assert any("VPC" in r for r in report.remaining)
    assert any("NAT security group" in r for r in report.remaining)
    inv = inventory(boto)
    assert inv["buckets"] == [] and inv["roles"] == [] and inv["alarms"] == []
    # Once the permission is fixed, teardown finishes the job.
    assert teardown(config, aws=make_aws(config)[0]).ok
    assert counts(inventory(boto)) == dict.fromkeys(EXPECTED_AFTER_SETUP, 0)


# ------------------------------------------------- the operator's permissions


@pytest.mark.slow
def test_every_call_is_covered_by_the_operator_policy(make_aws, config, boto) -> None:
    """Record every API call of plan/setup/status/teardown; each must be allowed."""
    from pygirder.cloud.policy import allows_action, iam_action, operator_policy

    aws_, faults, _ = make_aws(config)
    plan(config, aws=aws_)
    setup(config, aws=aws_)
    _leftovers(boto, account_resources(config, aws=aws_)["private_subnet_id"])
    status(config, aws=aws_)
    start_nat(config, aws=aws_)
    stop_nat(config, aws=aws_)
    teardown(config, aws=aws_, force=True)
    policy = operator_policy()
    used = sorted({iam_action(*call.split(".")) for call in faults.calls})
    assert len(used) > 60
    missing = [a for a in used if not allows_action(policy, a)]
    assert missing == []


def test_teardown_empties_a_bucket_of_more_than_one_listing_page(done, make_aws, boto) -> None:
    """A fleet leaves thousands of results under results/: teardown deletes them all,
    however the listing pages (one page holds 1,000 versions)."""
    config = done[0]
    bucket = f"pygirder-t-{ACCOUNT}-us-east-1"
    s3 = boto("s3")
    for i in range(1100):
        s3.put_object(Bucket=bucket, Key=f"results/{i:04d}", Body=b"r")
    for i in range(5):  # a second version of a few
        s3.put_object(Bucket=bucket, Key=f"results/{i:04d}", Body=b"s")
    aws_, _, _ = make_aws(config)
    report = teardown(config, aws=aws_)
    assert report.ok and report.remaining == [] and report.failures == []
    assert bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}
