"""The fleet controller's own instance role: one per fleet, made by ``up``, removed by
``down``, ``sweep`` and ``teardown`` (:class:`pygirder.cloud.leftovers.ControllerRoles`).

The redis node runs the controller, so when a fleet has one its redis node boots with
this role instead of the setup's instance role.  It holds two inline policies: the
instance policy (the redis node still reads the artifact, publishes its status and
reads its parameters) and :func:`.controller.controller_policy`, which reaches only
this fleet.  It carries the setup's permissions boundary, like every role pygirder
creates: its name is one of the instance roles' names, which the operator policy
allows creating only with the boundary.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from ..aws import Aws, RetryPolicy
from ..config import CloudConfig
from ..policy import (
    CONTROLLER_ROLE_PATTERN,
    ROLE_PATH,
    boundary_arn,
    instance_role_policy,
    instance_trust_policy,
    partition,
)
from ..tags import as_tag_list
from .naming import fleet_tags

INSTANCE_POLICY_NAME = "pygirder-instance"
CONTROLLER_POLICY_NAME = "pygirder-controller"
# IAM is eventually consistent: a new role or profile may be unknown for a few seconds.
VISIBLE_RETRY = RetryPolicy(attempts=20, base_delay=1.0, max_delay=5.0, jitter=False)


def controller_role_name(name: str, fleet: str) -> str:
    """``pygirder-<name>-<the fleet id's random part>-fleet-instance`` (role and
    profile); at most 61 characters, inside IAM's 64."""
    return CONTROLLER_ROLE_PATTERN.replace("*", f"{name}-{fleet.rsplit('-', 1)[-1]}")


def create_controller_role(
    aws: Aws, config: CloudConfig, res: dict[str, Any], fleet: str, expires: datetime
) -> str:
    """Role and instance profile of ``fleet``'s controller; returns the profile's ARN.

    ``res`` is :func:`account_resources`' answer.  Tagged as the fleet's, so whatever
    is left of it after a failed ``up`` is found by ``down`` and ``sweep``.
    """
    from .controller import controller_policy

    name = controller_role_name(config.name, fleet)
    p = partition(config.region)
    tags = as_tag_list(fleet_tags(config, fleet, expires))
    aws.call(
        "iam", "create_role", Path=ROLE_PATH, RoleName=name,
        AssumeRolePolicyDocument=json.dumps(instance_trust_policy()),
        Description=f"pygirder fleet {fleet}: the redis node and its fleet controller",
        PermissionsBoundary=boundary_arn(p, res["account_id"]), Tags=tags,
    )  # fmt: skip
    policies = {
        INSTANCE_POLICY_NAME: instance_role_policy(
            name=config.name, region=config.region, account_id=res["account_id"],
            bucket=res["bucket"], artifact_prefix=res["artifact_prefix"],
            topic_arn=res["topic_arn"],
        ),
        CONTROLLER_POLICY_NAME: controller_policy(
            name=config.name, fleet=fleet, region=config.region,
            account_id=res["account_id"], queue_arn=res["queue_arn"],
            worker_role_arn=res["role_arn"],
        ),
    }  # fmt: skip
    for policy_name, document in policies.items():
        aws.call_retrying(
            "iam", "put_role_policy", codes=("NoSuchEntity",), policy=VISIBLE_RETRY,
            RoleName=name, PolicyName=policy_name, PolicyDocument=json.dumps(document),
        )  # fmt: skip
    profile = aws.call(
        "iam", "create_instance_profile", Path=ROLE_PATH, InstanceProfileName=name, Tags=tags
    )["InstanceProfile"]
    aws.call_retrying(
        "iam", "add_role_to_instance_profile", codes=("NoSuchEntity",), policy=VISIBLE_RETRY,
        InstanceProfileName=name, RoleName=name,
    )  # fmt: skip
    return str(profile["Arn"])
