"""Shared helpers of the cloud tests: keys, fault injection, independent inventory.

Failures moto never produces (throttling, DependencyViolation, access denied,
eventual consistency) are injected into the *real* boto3 clients through
botocore's ``before-call`` event, the hook botocore's own Stubber uses: an injected
call returns an AWS error response instead of reaching moto; every other call goes
through to the moto server.
"""

from __future__ import annotations

from typing import Any

from pygirder.cloud.tags import TAG_NAME

ACCOUNT = "123456789012"

# Real OpenSSH ed25519 public keys; their private halves were thrown away.
PUBLIC_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDrZ2/fj2i2RDlxzFQE/0li3aGxvKT7OXirOAyehzMF4 "
    "tester@example"
)
OTHER_PUBLIC_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFteo/oyGnwekBVZ6485RmMhWyPmCsZ4vGGhLBeMRxvb "
    "tester@elsewhere"
)
SSH_FROM = "198.51.100.7/32"


class Faults:
    """Records every AWS call of a boto3 session and injects error responses.

    ``faults.fail("ec2.DeleteVpc", "DependencyViolation", times=2)`` makes the next
    two DeleteVpc calls fail; ``after=1`` lets that many calls through first.
    ``calls`` lists ``"service.Operation"`` for every call made (injected or not).
    """

    def __init__(self, boto_session: Any) -> None:
        self.calls: list[str] = []
        self.injected: list[str] = []
        self._plan: dict[str, list[tuple[str, int, str] | None]] = {}
        boto_session.events.register("before-call", self._before_call)

    def fail(
        self,
        operation: str,
        code: str,
        *,
        times: int = 1,
        after: int = 0,
        status: int = 400,
        message: str = "injected by the test",
    ) -> None:
        queue = self._plan.setdefault(operation, [])
        queue.extend([None] * after)
        queue.extend([(code, status, message)] * times)

    def _before_call(self, model: Any, **_: Any) -> Any:
        from botocore.awsrequest import AWSResponse

        key = f"{model.service_model.service_name}.{model.name}"
        self.calls.append(key)
        queue = self._plan.get(key)
        if not queue:
            return None
        spec = queue.pop(0)
        if spec is None:
            return None
        code, status, message = spec
        self.injected.append(f"{key}:{code}")
        parsed = {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        }
        return AWSResponse("https://injected.invalid", status, {}, None), parsed


class Sleeps(list):
    """A fake ``sleep`` that records the delays instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def fresh_session(region: str) -> Any:
    """A new boto3 Session (own events, own credentials) made the way pygirder makes
    them, so the big service models are parsed once per test run, not once per test."""
    from pygirder.cloud.aws import session
    from pygirder.cloud.config import config_from_dict

    return session(config_from_dict({"region": region}))


def tag_filter(name: str = "t") -> list[dict]:
    return [{"Name": f"tag:{TAG_NAME}", "Values": [name]}]


def inventory(boto, name: str = "t") -> dict[str, list[str]]:
    """Everything of setup ``name`` that exists, found without pygirder's code."""
    ec2 = boto("ec2")
    f = tag_filter(name)
    live = [
        i["InstanceId"]
        for r in ec2.describe_instances(Filters=f)["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] != "terminated"
    ]
    iam = boto("iam")
    prefix = f"pygirder-{name}-"
    out = {
        "vpcs": [v["VpcId"] for v in ec2.describe_vpcs(Filters=f)["Vpcs"]],
        "subnets": [s["SubnetId"] for s in ec2.describe_subnets(Filters=f)["Subnets"]],
        "igws": [
            g["InternetGatewayId"]
            for g in ec2.describe_internet_gateways(Filters=f)["InternetGateways"]
        ],
        "route_tables": [
            t["RouteTableId"] for t in ec2.describe_route_tables(Filters=f)["RouteTables"]
        ],
        "security_groups": [
            g["GroupId"] for g in ec2.describe_security_groups(Filters=f)["SecurityGroups"]
        ],
        "instances": live,
        "nat_gateways": [
            g["NatGatewayId"]
            for g in ec2.describe_nat_gateways(Filters=f)["NatGateways"]
            if g["State"] not in ("deleted", "failed")
        ],
        "addresses": [a["AllocationId"] for a in ec2.describe_addresses(Filters=f)["Addresses"]],
        "endpoints": [
            e["VpcEndpointId"]
            for e in ec2.describe_vpc_endpoints(Filters=f)["VpcEndpoints"]
            if e["State"].lower() not in ("deleted", "deleting")
        ],
        "key_pairs": [k["KeyName"] for k in ec2.describe_key_pairs(Filters=f)["KeyPairs"]],
        "launch_templates": [
            t["LaunchTemplateId"]
            for t in ec2.describe_launch_templates(Filters=f)["LaunchTemplates"]
        ],
        "volumes": [
            v["VolumeId"]
            for v in ec2.describe_volumes(Filters=f)["Volumes"]
            if v["State"] != "deleted"
        ],
        "roles": [
            r["RoleName"] for r in iam.list_roles()["Roles"] if r["RoleName"].startswith(prefix)
        ],
        "instance_profiles": [
            p["InstanceProfileName"]
            for p in iam.list_instance_profiles()["InstanceProfiles"]
            if p["InstanceProfileName"].startswith(prefix)
        ],
        "buckets": [
            b["Name"] for b in boto("s3").list_buckets()["Buckets"] if b["Name"].startswith(prefix)
        ],
        "topics": [
            t["TopicArn"]
            for t in boto("sns").list_topics()["Topics"]
            if t["TopicArn"].split(":")[-1].startswith(prefix)
        ],
        "queues": boto("sqs").list_queues(QueueNamePrefix=prefix).get("QueueUrls", []),
        "alarms": [
            a["AlarmName"]
            for a in boto("cloudwatch").describe_alarms(AlarmNamePrefix=prefix)["MetricAlarms"]
        ],
        "budgets": [
            b["BudgetName"]
            for b in boto("budgets").describe_budgets(AccountId=ACCOUNT).get("Budgets", [])
            if b["BudgetName"].startswith(prefix)
        ],
        "parameters": [
            p["Name"]
            for p in boto("ssm").get_parameters_by_path(Path=f"/pygirder/{name}", Recursive=True)[
                "Parameters"
            ]
        ],
    }
    return out


def counts(inv: dict[str, list[str]]) -> dict[str, int]:
    return {k: len(v) for k, v in inv.items()}


EXPECTED_AFTER_SETUP = {
    "vpcs": 1,
    "subnets": 2,
    "igws": 1,
    "route_tables": 2,
    "security_groups": 2,
    "instances": 1,
    "nat_gateways": 0,
    "addresses": 0,
    "endpoints": 1,
    "key_pairs": 2,
    "launch_templates": 0,
    "volumes": 1,
    "roles": 1,
    "instance_profiles": 1,
    "buckets": 1,
    "topics": 2,
    "queues": 1,
    "alarms": 3,
    "budgets": 1,
    "parameters": 0,
}
