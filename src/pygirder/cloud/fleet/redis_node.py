"""The redis node's address, and its replacement when it is lost.

``up`` writes the ready redis node's address, as ``DescribeInstances`` reports it, to
``/pygirder/<name>/<fleet>/redis-address`` (tagged as the fleet's, so ``down`` removes
it); the agents of workers and distributors read it (:mod:`..instance.follow`).

The fleet controller runs on the redis node and is lost with it, so it cannot
replace it: ``up`` on the fleet does (:func:`replace_redis_node`, called by
:func:`.converge.converge`).  It launches one node from the fleet's own redis launch
template (same user-data, password, role and controller), on-demand unless
``redis_market = "spot"``, waits for its ``ready`` announcement, and writes the new
address; the workers then follow it.  The grid's state of the lost node (queues,
calls in flight) is gone; the results the workers wrote to the durable store are
not, so a job submitted again is answered from the store except for the calls that
were in flight.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import TYPE_CHECKING

from ..aws import Aws
from ..config import CloudConfig
from ..errors import FleetError
from ..instance.common import DEFAULT_REDIS_PORT, Role
from ..instance.follow import check_grid_address, redis_address_parameter
from .members import Member, MemberState, RoleLaunch, fill
from .naming import launch_id, put_fleet_parameter

if TYPE_CHECKING:
    from .launch import _Up


def grid_address(private_ip: str) -> str:
    return check_grid_address(f"redis://{private_ip}:{DEFAULT_REDIS_PORT}/0")


def write_redis_address(
    aws: Aws, config: CloudConfig, fleet: str, url: str, expires: datetime
) -> None:
    """Store where the fleet's grid is (tagged as the fleet's)."""
    put_fleet_parameter(
        aws, config, fleet, redis_address_parameter(config.name, fleet),
        check_grid_address(url), description=f"Address of the redis node of pygirder fleet "
        f"{fleet}", expires=expires,
    )  # fmt: skip


def node_address(aws: Aws, launch: RoleLaunch, node: Member) -> str:
    """The grid address of a ready redis node, from EC2 (never from its announcement)."""
    if not node.private_ip:
        fill(aws, launch, [node.instance_id])
    if not node.private_ip:
        raise FleetError(
            f"EC2 lists no private address for the redis node {node.instance_id}",
            code="NoAddress",
        )
    return grid_address(node.private_ip)


def replace_redis_node(
    runner: _Up,
    template_id: str,
    subnets: list[str],
    instance_type: str,
    deadline: float,
) -> tuple[str, str]:
    """Launch a redis node from the fleet's template and wait until it is ready;
    returns (instance id, grid address).  Raises when none is ready by ``deadline``
    (nothing of the attempt is left running)."""
    fleet = runner.fleet
    launch = RoleLaunch(Role.REDIS, 1, launch_id(fleet, Role.REDIS), subnets,
                        instance_types=(instance_type,))  # fmt: skip
    launch.template_id = template_id
    # A lost node's launch used the launch id's tokens: this one needs its own.
    launch.token = f"{launch.launch_id}-{secrets.token_hex(4)}"
    runner.launches = [launch]
    runner.say(f"the redis node of fleet {fleet} is lost: launching a replacement")
    runner.converge([launch], deadline)
    runner.settle([launch])
    ready = launch.in_state(MemberState.READY)
    if not ready:
        why = launch.stopped or (launch.errors[-1] if launch.errors else "") or "no reason given"
        hints = runner.details[-3:]
        raise FleetError(
            f"no replacement redis node of fleet {fleet} was ready in time ({why}"
            + (f"; {' | '.join(hints)}" if hints else "")
            + f"). Run `pygirder cloud up --fleet {fleet}` again, or choose another "
            "--redis-type",
            code="NoRedisNode",
        )
    node = ready[0]
    url = node_address(runner.aws, launch, node)
    write_redis_address(runner.aws, runner.config, fleet, url, runner.expires)
    runner.say(f"redis node {node.instance_id} is ready at {node.private_ip}; workers follow it")
    return node.instance_id, url
