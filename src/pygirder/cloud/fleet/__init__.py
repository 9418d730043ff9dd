"""The spot fleet: launch it (``up``), find and price it by tag, reach its grid, remove it.

A fleet is one ``redis`` node, optional ``distributor`` nodes and ``worker`` nodes,
each an EC2 spot instance that boots with the user-data of ``userdata.py`` and runs
the on-instance agent.  Nothing about a fleet is remembered locally but its pinned SSH
host keys (``~/.pygirder/known_hosts/<fleet>``): every command finds it again by its
tags (``pygirder:managed``, ``pygirder:name``, ``pygirder:fleet``, ``pygirder:role``,
``pygirder:expires``, plus ``pygirder:launch`` below), and its addresses with
DescribeInstances.  Announcements count only for instances the fleet launched.

The package is cut by concept: :mod:`.naming` (ids, tags, filters), :mod:`.launch`
(``up``'s state machine) over :mod:`.members` (what it tracks), :mod:`.templates`
(what the instances boot) and :mod:`.capacity` (spot requests), :mod:`.sources`
(image and artifact), :mod:`.inventory` (status, cost, the dashboard's rows),
:mod:`.access` (routes to the grid, remote commands) and
:mod:`.teardown` (``down``, ``sweep`` and their proof, over the kinds of
:mod:`pygirder.cloud.leftovers` that the account ``teardown`` uses too).

Reaching the grid is pluggable (:data:`ROUTES`): the redis node's private address
directly when it answers (a rehearsal on 127.0.0.x, or a laptop inside the VPC), else
an SSH tunnel through the redis node's public address, else an SSM port forward.
Commands on instances (``exec``) go through a pluggable :data:`Runner`: SSH on AWS;
a rehearsal passes one that runs the command inside the simulated instance.
"""

from __future__ import annotations

from ..errors import FleetError, FleetNotReadyError, NoFleetError
from .access import (
    ROUTES,
    ExecResult,
    exec_role,
    grid_url,
    instance_row,
    redis_password,
    ssh_command,
)
from .inventory import (
    FleetStatus,
    InstanceRow,
    dashboard_instances,
    fleet_cost,
    fleet_status,
    live_fleets,
)
from .launch import FleetSummary, UpOptions, up
from .members import Member, MemberState
from .naming import DEFAULT_INSTANCE_TYPES, TAG_LAUNCH
from .teardown import DownReport, Orphan, down, find_orphans, fleet_leftovers, sweep

__all__ = [
    "DEFAULT_INSTANCE_TYPES",
    "ROUTES",
    "TAG_LAUNCH",
    "DownReport",
    "ExecResult",
    "FleetError",
    "FleetNotReadyError",
    "FleetStatus",
    "FleetSummary",
    "InstanceRow",
    "Member",
    "MemberState",
    "NoFleetError",
    "Orphan",
    "UpOptions",
    "dashboard_instances",
    "down",
    "exec_role",
    "find_orphans",
    "fleet_cost",
    "fleet_leftovers",
    "fleet_status",
    "grid_url",
    "instance_row",
    "live_fleets",
    "redis_password",
    "ssh_command",
    "sweep",
    "up",
]
