"""What ``up`` tracks: each launched instance (:class:`Member`) and each role's launch.

A member's addresses and placement come from EC2 (:func:`fill`), never from what
the instance announced.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from ..aws import Aws
from ..instance.common import Role


class MemberState(enum.StrEnum):
    """Where one launched instance stands, as ``up`` sees it."""

    LAUNCHED = "launched"  # EC2 gave us the instance; its agent has not spoken yet
    BOOTING = "booting"  # announced ``up``: installing the artifact, starting its service
    READY = "ready"  # announced ``ready``: its service serves
    FAILED = "failed"  # announced ``failed`` (a broken boot is not replaced)
    GONE = "gone"  # terminated, reclaimed or going away before the launch finished


ACTIVE = (MemberState.LAUNCHED, MemberState.BOOTING, MemberState.READY)


@dataclass
class Member:
    """One instance of a launch."""

    instance_id: str
    role: str
    state: MemberState = MemberState.LAUNCHED
    instance_type: str = ""
    subnet_id: str = ""
    zone: str = ""
    private_ip: str = ""
    public_ip: str = ""
    detail: str = ""
    host_keys: tuple[str, ...] = ()


@dataclass
class RoleLaunch:
    """One role's launch: its template, its members and its retry state."""

    role: Role
    count: int
    launch_id: str
    subnet_ids: list[str]
    pool: str = "default"
    parent: str | None = None
    template_id: str = ""
    members: dict[str, Member] = field(default_factory=dict)
    blocked: dict[tuple[str, str], float] = field(default_factory=dict)
    attempts: int = 0
    next_at: float = 0.0
    stopped: str = ""
    errors: list[str] = field(default_factory=list)
    instance_types: tuple[str, ...] = ()
    """Types this launch diversifies over; empty: the fleet's (``--instance-types``)."""
    token: str = ""
    """Prefix of CreateFleet client tokens (default: the launch id); a later grow of
    the same launch needs its own, or EC2 would answer with the first launch."""

    def in_state(self, *states: MemberState) -> list[Member]:
        return [m for m in self.members.values() if m.state in states]

    @property
    def ready(self) -> int:
        return len(self.in_state(MemberState.READY))

    @property
    def shortfall(self) -> int:
        held = len(self.in_state(*ACTIVE, MemberState.FAILED))
        return max(0, self.count - held)


def fill(aws: Aws, launch: RoleLaunch, ids: list[str]) -> None:
    """Zone and addresses of new instances (EC2 may not list them yet: later then)."""
    got = aws.call(
        "ec2", "describe_instances", InstanceIds=ids, ignore=("InvalidInstanceID.NotFound",)
    )
    for reservation in (got or {}).get("Reservations", []):
        for inst in reservation.get("Instances", []):
            update(launch.members.get(inst["InstanceId"]), inst)


def update(member: Member | None, inst: dict[str, Any]) -> None:
    """Copy what EC2 says of an instance (``DescribeInstances``) into its member."""
    if member is None:
        return
    member.zone = inst.get("Placement", {}).get("AvailabilityZone", member.zone)
    member.subnet_id = inst.get("SubnetId", member.subnet_id)
    member.instance_type = inst.get("InstanceType", member.instance_type)
    member.public_ip = inst.get("PublicIpAddress", member.public_ip) or ""
    member.private_ip = inst.get("PrivateIpAddress", member.private_ip) or ""
