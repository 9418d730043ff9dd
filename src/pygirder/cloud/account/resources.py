"""What the fleet, image and artifact commands need from a set-up account.

:func:`account_resources` discovers ids and ARNs by tag; :func:`start_nat` and
:func:`stop_nat` switch the NAT instance on for a fleet and off after it.
"""

from __future__ import annotations

from typing import Any

from ..aws import Aws
from ..config import CloudConfig
from ..errors import NotSetUpError
from .nat import NatInstance
from .verbs import account_kinds, context

# ----------------------------------------------------------- for other modules


def account_resources(
    config: CloudConfig, *, aws: Aws | None = None, strict: bool = True
) -> dict[str, Any]:
    """Ids and ARNs of the account resources, discovered by tag, for fleet code.

    Keys: ``name, region, zone, account_id, bucket, artifact_prefix, ssm_prefix,
    topic_arn, queue_url, queue_arn, role_name, role_arn, instance_profile_name,
    instance_profile_arn, vpc_id, public_subnet_id, private_subnet_id, subnet_ids,
    security_group_id, key_name, cluster_key_name, cluster_key_file, nat,
    nat_instance_id, nat_gateway_id, billing_topic_arn``.

    The status queue receives the status topic's messages with raw delivery: a
    message body is exactly what an instance published.  With ``strict`` (the
    default) a missing resource raises :class:`NotSetUpError`; otherwise its value
    is ``None``.
    """
    ctx = context(config, aws, None)
    wanted = [k for k in account_kinds(config) if k.wanted(config)]
    found = {}
    for kind in wanted:
        items = kind.find(ctx)
        ctx.found[kind.key] = items
        found[kind.key] = items[0] if items else None
    required = [
        "role",
        "instance-profile",
        "bucket",
        "status-topic",
        "status-queue",
        "status-subscription",
        "user-key",
        "cluster-key",
        "vpc",
        "public-subnet",
        "private-subnet",
        "cluster-sg",
        "nat-instance" if config.nat == "instance" else "nat-gateway",
    ]
    missing = [key for key in required if found.get(key) is None]
    if missing and strict:
        raise NotSetUpError(
            f"the AWS account is not set up for {config.name!r} (missing: "
            f"{', '.join(missing)}): run `pygirder cloud setup`",
            missing=missing,
        )

    def attr(key: str, name: str = "id") -> Any:
        f = found.get(key)
        return getattr(f, name) if f is not None else None

    public, private = attr("public-subnet"), attr("private-subnet")
    return {
        "name": config.name,
        "region": config.region,
        "zone": config.zone,
        "account_id": ctx.account_id,
        "bucket": attr("bucket"),
        "artifact_prefix": config.artifact_prefix,
        "ssm_prefix": config.ssm_prefix,
        "topic_arn": attr("status-topic"),
        "queue_url": attr("status-queue"),
        "queue_arn": attr("status-queue", "arn"),
        "role_name": attr("role"),
        "role_arn": attr("role", "arn"),
        "instance_profile_name": attr("instance-profile"),
        "instance_profile_arn": attr("instance-profile", "arn"),
        "vpc_id": attr("vpc"),
        "public_subnet_id": public,
        "private_subnet_id": private,
        "subnet_ids": {"public": public, "private": private},
        "security_group_id": attr("cluster-sg"),
        "key_name": attr("user-key", "name"),
        "cluster_key_name": attr("cluster-key", "name"),
        "cluster_key_file": str(config.cluster_key_path),
        "nat": config.nat,
        "nat_instance_id": attr("nat-instance"),
        "nat_gateway_id": attr("nat-gateway"),
        "billing_topic_arn": attr("billing-topic"),
    }


def start_nat(config: CloudConfig, *, aws: Aws | None = None, wait: bool = True) -> str | None:
    """Start the NAT instance (fleet ``up``); returns its id, ``None`` for a gateway."""
    ctx = context(config, aws, None)
    nat = NatInstance()
    found = nat.find(ctx)
    if not found:
        if config.nat == "gateway":
            return None
        raise NotSetUpError("no NAT instance: run `pygirder cloud setup`", missing=[nat.key])
    iid, state = found[0].id, found[0].state
    if state == "stopping":
        nat._wait_state(ctx, iid, "stopped")
        state = "stopped"
    if state == "stopped":
        ctx.ec2("start_instances", InstanceIds=[iid])
    if wait and state != "running":
        nat._wait_state(ctx, iid, "running")
    return iid


def stop_nat(config: CloudConfig, *, aws: Aws | None = None) -> str | None:
    """Stop the NAT instance (fleet ``down``) so it costs only its disk."""
    ctx = context(config, aws, None)
    found = NatInstance().find(ctx)
    if not found:
        return None
    if found[0].state in ("pending", "running"):
        ctx.ec2("stop_instances", InstanceIds=[found[0].id])
    return found[0].id
