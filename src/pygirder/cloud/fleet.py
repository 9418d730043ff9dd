"""The spot fleet: launch it (``up``), find and price it by tag, reach its grid, remove it.

A fleet is one ``redis`` node, optional ``distributor`` nodes and ``worker`` nodes,
each an EC2 spot instance that boots with the user-data of ``userdata.py`` and runs
the on-instance agent.  Nothing about a fleet is remembered locally but its pinned SSH
host keys (``~/.pygirder/known_hosts/<fleet>``): every command finds it again by its
tags (``pygirder:managed``, ``pygirder:name``, ``pygirder:fleet``, ``pygirder:role``,
``pygirder:expires``, plus ``pygirder:launch`` below), and its addresses with
DescribeInstances.  Announcements count only for instances the fleet launched.

``up`` launches with EC2 Fleet of type ``instant`` from one launch template per role,
diversified over instance types and subnets (capacity-optimized).  Capacity errors and
partial fulfilment are normal on spot: the shortfall is asked for again, from pools
that did not just fail, with capped exponential backoff, until the deadline.  An
instance counts as ready when its agent *announces* ``ready`` on the status queue
(matched by the launch id in its user-data), not when EC2 says ``running``: only the
agent knows that the artifact is installed and the service serves.  Stragglers are
terminated at the deadline; too few ready instances is an error that removes the
fleet before it is raised, so a failed ``up`` leaves nothing billable behind.

``down`` and ``sweep`` remove by tag and then ask AWS again, with independent queries,
what of the fleet is left (:func:`fleet_leftovers`): that answer, not the absence of
errors, is the proof that nothing billable remains.

Reaching the grid is pluggable (:data:`ROUTES`): the redis node's private address
directly when it answers (a rehearsal on 127.0.0.x, or a laptop inside the VPC), else
an SSH tunnel through the redis node's public address, else an SSM port forward.
Commands on instances (``exec``) go through a pluggable :data:`Runner`: SSH on AWS;
a rehearsal passes one that runs the command inside the simulated instance.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import io
import json
import logging
import math
import os
import random
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from ..errors import ConfigError
from .agent import DEFAULT_REDIS_PORT, DEFAULT_SPOT_INTERVAL_S, Announcement, Role
from .aws import Aws, is_quota_code
from .config import CloudConfig
from .errors import CloudError, CloudTimeoutError, FleetError, FleetNotReadyError, NoFleetError
from .tags import (
    MANAGED_VALUE,
    TAG_EXPIRES,
    TAG_FLEET,
    TAG_MANAGED,
    TAG_NAME,
    TAG_ROLE,
    as_tag_list,
    ec2_filters,
    from_tag_list,
    ownership_tags,
)

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
    "live_fleets",
    "redis_password",
    "ssh_command",
    "sweep",
    "up",
]

log = logging.getLogger("pygirder.fleet")

# The launch an instance belongs to: ``<fleet>-<role>``, also in its user-data, so an
# announcement is matched to the launch that asked for it.
TAG_LAUNCH = "pygirder:launch"
# Where the SSH host keys of each fleet's instances are pinned: one known_hosts file
# per fleet, written by ``up`` from what the instances announced.
KNOWN_HOSTS_DIR = Path("~/.pygirder/known_hosts")

# x86-64 types of one size with plenty of spot capacity; ``--instance-types`` overrides.
DEFAULT_INSTANCE_TYPES = (
    "m7a.large",
    "m6a.large",
    "m6i.large",
    "c7a.large",
    "c6a.large",
    "c6i.large",
)
DEFAULT_TTL_S = 4 * 3600.0
DEFAULT_DEADLINE_S = 600.0
SSH_USER = "ec2-user"  # Amazon Linux, the template image's base
LIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]
# The launch minute, then 64 random bits (older fleets have 16: still accepted).
_FLEET_ID_RE = re.compile(r"^fl-[0-9]{8}-[0-9]{4}-(?:[0-9a-f]{16}|[0-9a-f]{4})$")
FLEET_ID_RANDOM_BYTES = 8

# CreateFleet error codes, by what they mean for the launch loop.
# A pool (instance type x subnet) is out of spot capacity right now: try others now,
# this one again after POOL_COOLDOWN_S.
CAPACITY_CODES = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InsufficientCapacity",
        "InsufficientFreeAddressesInSubnet",
        "UnfulfillableCapacity",
        "capacity-not-available",
        "SpotCapacityNotAvailable",
    }
)
# The pool cannot work at all (type not offered there, price cap below the market).
POOL_UNUSABLE_CODES = frozenset(
    {"Unsupported", "SpotMaxPriceTooLow", "InvalidInstanceType", "InstanceTypeNotSupported"}
)
# An account quota: asking again will not help before the quota is raised.
QUOTA_CODES = frozenset(
    {"MaxSpotInstanceCountExceeded", "VcpuLimitExceeded", "InstanceLimitExceeded"}
)
POOL_COOLDOWN_S = 60.0
# How often the launch loop asks EC2 which of its instances died before announcing.
REFRESH_INTERVAL_S = 5.0
# Seconds one receive on the status queue may wait (long polling).
QUEUE_WAIT_S = 2


# ------------------------------------------------------------------------ helpers


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _stamp(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        when = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _as_utc(value: Any) -> datetime | None:
    """A boto3 timestamp (datetime) or an ISO string as an aware UTC datetime."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return _parse_time(value)


def new_fleet_id(now: datetime | None = None) -> str:
    """``fl-YYYYMMDD-HHMM-<16 hex>``: sortable by launch time, and 64 random bits, so
    nobody guesses the id of the next fleet (its SSM path, its launch ids)."""
    now = now or _utcnow()
    return f"fl-{now:%Y%m%d-%H%M}-{secrets.token_hex(FLEET_ID_RANDOM_BYTES)}"


def check_fleet_id(fleet: str) -> str:
    if not _FLEET_ID_RE.match(fleet):
        raise ConfigError(
            f"--fleet {fleet!r} is not a fleet id (fl-YYYYMMDD-HHMM- and 16 hex digits, "
            "as `pygirder cloud fleet` lists them)"
        )
    return fleet


def launch_id(fleet: str, role: Role | str) -> str:
    return f"{fleet}-{Role(role)}"


def fleet_filters(name: str | None, fleet: str | None = None) -> list[dict[str, Any]]:
    """EC2 filters for what a fleet (or any fleet of setup ``name``, or of any setup
    when ``name`` is None) created."""
    if name is None:
        filters = [{"Name": f"tag:{TAG_MANAGED}", "Values": [MANAGED_VALUE]}]
    else:
        filters = ec2_filters(name)
    if fleet:
        filters.append({"Name": f"tag:{TAG_FLEET}", "Values": [fleet]})
    else:
        filters.append({"Name": "tag-key", "Values": [TAG_FLEET]})
    return filters


def fleet_tags(config: CloudConfig, fleet: str, expires: datetime, role: str | None = None) -> dict:
    tags = {
        **config.tags,
        **ownership_tags(config.name),
        TAG_FLEET: fleet,
        TAG_EXPIRES: _stamp(expires),
    }
    if role:
        tags[TAG_ROLE] = role
        tags[TAG_LAUNCH] = launch_id(fleet, role)
        tags["Name"] = f"pygirder-{config.name}-{fleet}-{role}"
    return tags


def _describe_instances(aws: Aws, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for page in aws.pages("ec2", "describe_instances", Filters=filters):
        for reservation in page.get("Reservations", []):
            out.extend(reservation.get("Instances", []))
    return out


def instances_of(
    aws: Aws, name: str | None, fleet: str | None = None, states: Sequence[str] = LIVE_STATES
) -> list[dict[str, Any]]:
    """Instances of a fleet (or of every fleet of ``name``) in ``states``, by tag."""
    filters = [*fleet_filters(name, fleet), {"Name": "instance-state-name", "Values": list(states)}]
    return _describe_instances(aws, filters)


def live_fleets(config: CloudConfig, *, aws: Aws | None = None) -> dict[str, list[dict]]:
    """Fleet id -> its live instances, for every fleet of this setup that has any
    instance, EC2 fleet or launch template left."""
    aws = aws or Aws(config)
    found: dict[str, list[dict]] = {}
    for inst in instances_of(aws, config.name):
        fleet = from_tag_list(inst.get("Tags")).get(TAG_FLEET, "")
        found.setdefault(fleet, []).append(inst)
    for kind in ("ec2-fleets", "launch-templates"):
        for item in _find_kind(aws, kind, config.name, None):
            found.setdefault(item["fleet"], [])
    found.pop("", None)
    return dict(sorted(found.items()))


def resolve_fleet(config: CloudConfig, fleet: str | None, *, aws: Aws) -> str:
    """``fleet`` if given, else the only fleet of this setup; a clear error otherwise."""
    if fleet:
        return check_fleet_id(fleet)
    fleets = live_fleets(config, aws=aws)
    if not fleets:
        raise NoFleetError(
            f"no fleet of {config.name!r} is up in {config.region}: start one with "
            "`pygirder cloud up --workers N`",
            code="NoFleet",
        )
    if len(fleets) > 1:
        raise NoFleetError(
            f"{len(fleets)} fleets of {config.name!r} are up ({', '.join(fleets)}): "
            "choose one with --fleet",
            code="AmbiguousFleet",
        )
    return next(iter(fleets))


# ------------------------------------------------------------------ spot prices


def spot_prices(aws: Aws, pools: set[tuple[str, str]]) -> dict[tuple[str, str], float | None]:
    """The current spot price ($/hour) of each (instance type, zone), None if unknown."""
    out: dict[tuple[str, str], float | None] = {pool: None for pool in pools}
    types = sorted({t for t, _ in pools if t})
    if not types:
        return out
    got = aws.call(
        "ec2",
        "describe_spot_price_history",
        InstanceTypes=types,
        ProductDescriptions=["Linux/UNIX", "Linux/UNIX (Amazon VPC)"],
        StartTime=_utcnow(),
        ignore=("UnsupportedOperation",),
    )
    latest: dict[tuple[str, str], tuple[datetime, float]] = {}
    for item in (got or {}).get("SpotPriceHistory", []):
        key = (item.get("InstanceType", ""), item.get("AvailabilityZone", ""))
        if key not in out:
            continue
        when = _as_utc(item.get("Timestamp")) or datetime.min.replace(tzinfo=UTC)
        try:
            price = float(item["SpotPrice"])
        except (KeyError, ValueError):
            continue
        if key not in latest or when > latest[key][0]:
            latest[key] = (when, price)
    for key, (_, price) in latest.items():
        out[key] = price
    return out


# ---------------------------------------------------------------------- up


class MemberState(enum.StrEnum):
    """Where one launched instance stands, as ``up`` sees it."""

    LAUNCHED = "launched"  # EC2 gave us the instance; its agent has not spoken yet
    BOOTING = "booting"  # announced ``up``: installing the artifact, starting its service
    READY = "ready"  # announced ``ready``: its service serves
    FAILED = "failed"  # announced ``failed`` (a broken boot is not replaced)
    GONE = "gone"  # terminated, reclaimed or going away before the launch finished


_ACTIVE = (MemberState.LAUNCHED, MemberState.BOOTING, MemberState.READY)


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
class UpOptions:
    """What ``up`` launches; the CLI fills it from its options."""

    workers: int = 1
    distributors: int = 0
    instance_types: tuple[str, ...] = DEFAULT_INSTANCE_TYPES
    max_price: float | None = None
    """Highest spot price per instance-hour (USD); None: up to the on-demand price."""
    ttl_s: float = DEFAULT_TTL_S
    min_workers: int | None = None
    """Fewest ready workers that make a usable fleet; None: 1."""
    deadline_s: float = DEFAULT_DEADLINE_S
    imports: tuple[str, ...] | None = None
    """Modules the workers import; None: the pushed project's top-level modules."""
    processes: str = "auto"
    image_id: str | None = None
    artifact: str | None = None
    """``s3://...`` URI or SHA-256 (prefix) of a pushed artifact; None: the newest."""
    public_workers: bool = False
    """Workers and distributors in the public subnet (no NAT needed)."""
    spot_interval_s: float = DEFAULT_SPOT_INTERVAL_S
    backoff_s: tuple[float, float] = (2.0, 30.0)
    """Delay before asking again for a shortfall: first delay, cap."""

    def check(self) -> None:
        problems = []
        if self.workers < 1:
            problems.append("--workers must be at least 1")
        if self.distributors < 0:
            problems.append("--distributors cannot be negative")
        if self.min_workers is not None and not 0 < self.min_workers <= self.workers:
            problems.append(f"--min must be between 1 and --workers ({self.workers})")
        if not self.instance_types:
            problems.append("--instance-types needs at least one instance type")
        if self.max_price is not None and self.max_price <= 0:
            problems.append("--max-price must be a positive price per hour")
        if self.ttl_s <= 0 or self.deadline_s <= 0:
            problems.append("--ttl and --deadline must be positive durations")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass
class _Launch:
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

    def in_state(self, *states: MemberState) -> list[Member]:
        return [m for m in self.members.values() if m.state in states]

    @property
    def ready(self) -> int:
        return len(self.in_state(MemberState.READY))

    @property
    def shortfall(self) -> int:
        held = len(self.in_state(*_ACTIVE, MemberState.FAILED))
        return max(0, self.count - held)


@dataclass
class FleetSummary:
    """What ``up`` built (ready members only) and what it had to remove."""

    fleet: str
    name: str
    region: str
    expires: datetime
    members: list[Member]
    removed: list[Member]
    requested: dict[str, int]
    prices: dict[str, float | None]
    """Instance id -> spot price per hour (None: unknown)."""

    @property
    def hourly_usd(self) -> float | None:
        prices = [self.prices.get(m.instance_id) for m in self.members]
        return None if any(p is None for p in prices) else sum(p or 0.0 for p in prices)

    def ready(self, role: str) -> int:
        return sum(1 for m in self.members if m.role == role)


class Progress(Protocol):
    """Told after every change how many instances of each role are ready."""

    def __call__(self, role: str, ready: int, requested: int, launched: int) -> None: ...


class _Up:
    """One run of ``up``; see :func:`up`."""

    def __init__(
        self,
        config: CloudConfig,
        options: UpOptions,
        aws: Aws,
        say: Callable[[str], None],
        progress: Progress | None,
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.options = options
        self.aws = aws
        self.say = say
        self.progress = progress
        self.clock = clock
        self.fleet = new_fleet_id()
        self.expires = _utcnow() + timedelta(seconds=options.ttl_s)
        self.res: dict[str, Any] = {}
        self.launches: list[_Launch] = []
        self.removed: list[Member] = []
        self.details: list[str] = []
        self.last_refresh = 0.0
        self.other_fleets: dict[str, bool] = {}
        self.strangers: set[str] = set()  # instance ids that are not this fleet's

    # -- preparation --------------------------------------------------------------
    def prepare(self) -> tuple[str, str, str, tuple[str, ...]]:
        """Account resources, image, artifact and imports; fails before creating anything."""
        from .account import account_resources

        self.res = account_resources(self.config, aws=self.aws)
        image = self.options.image_id or find_image(self.config, aws=self.aws)
        uri, sha, modules = resolve_artifact(
            self.res["bucket"], self.res["artifact_prefix"], self.options.artifact
        )
        imports = self.options.imports if self.options.imports is not None else tuple(modules)
        return image, uri, sha, imports

    def store_password(self) -> None:
        """The fleet's Redis password, a tagged SecureString only the fleet can read."""
        from .agent import redis_password_parameter

        self.aws.call(
            "ssm",
            "put_parameter",
            Name=redis_password_parameter(self.config.name, self.fleet),
            Description=f"Redis password of pygirder fleet {self.fleet}",
            Value=secrets.token_urlsafe(32),
            Type="SecureString",
            Tags=as_tag_list(fleet_tags(self.config, self.fleet, self.expires)),
        )

    def template(self, launch: _Launch, image_id: str, user_data: str) -> None:
        """The launch template of one role: everything but the type and the subnet."""
        tags = as_tag_list(fleet_tags(self.config, self.fleet, self.expires, str(launch.role)))
        data = {
            "ImageId": image_id,
            "UserData": base64.b64encode(user_data.encode()).decode(),
            "IamInstanceProfile": {"Arn": self.res["instance_profile_arn"]},
            "SecurityGroupIds": [self.res["security_group_id"]],
            "KeyName": self.res["key_name"],
            "InstanceInitiatedShutdownBehavior": "terminate",
            "MetadataOptions": {
                "HttpTokens": "required",
                "HttpEndpoint": "enabled",
                "HttpPutResponseHopLimit": 1,
                "InstanceMetadataTags": "enabled",
            },
            "TagSpecifications": [
                {"ResourceType": kind, "Tags": tags}
                for kind in ("instance", "volume", "network-interface", "spot-instances-request")
            ],
        }
        got = self.aws.call(
            "ec2",
            "create_launch_template",
            LaunchTemplateName=f"pygirder-{self.config.name}-{launch.launch_id}",
            LaunchTemplateData=data,
            ClientToken=f"{launch.launch_id}-lt"[:64],
            TagSpecifications=[{"ResourceType": "launch-template", "Tags": tags}],
        )
        launch.template_id = got["LaunchTemplate"]["LaunchTemplateId"]

    def user_data(
        self, launch: _Launch, uri: str, sha: str, imports: tuple[str, ...], redis: str | None
    ) -> str:
        from .userdata import render_user_data

        return render_user_data(
            topic_arn=self.res["topic_arn"],
            region=self.config.region,
            launch_id=launch.launch_id,
            fleet=self.fleet,
            name=self.config.name,
            role=launch.role,
            artifact_uri=uri,
            artifact_sha256=sha,
            redis=redis,
            pool=launch.pool,
            parent=launch.parent,
            imports=imports if launch.role is Role.WORKER else (),
            processes=self.options.processes,
            expires=self.expires,
            spot_interval_s=self.options.spot_interval_s,
        )

    # -- launching ----------------------------------------------------------------
    def pools(self, launch: _Launch) -> list[tuple[str, str]]:
        now = self.clock()
        every = [(t, s) for t in self.options.instance_types for s in launch.subnet_ids]
        usable = [p for p in every if launch.blocked.get(p, 0.0) <= now]
        if not usable:
            # Every pool failed recently: forget the cool-downs, keep the permanent bans.
            launch.blocked = {p: u for p, u in launch.blocked.items() if math.isinf(u)}
            usable = [p for p in every if p not in launch.blocked]
        return usable

    def launch(self, launch: _Launch) -> None:
        """One CreateFleet for the shortfall of ``launch``; errors shape the next try."""
        wanted = launch.shortfall
        pools = self.pools(launch)
        if not pools:
            launch.stopped = "no instance type can be launched in the subnets: " + "; ".join(
                launch.errors[-3:]
            )
            return
        launch.attempts += 1
        overrides = []
        for instance_type, subnet in pools:
            override: dict[str, Any] = {"InstanceType": instance_type, "SubnetId": subnet}
            if self.options.max_price is not None:
                override["MaxPrice"] = f"{self.options.max_price:.5f}"
            overrides.append(override)
        tags = as_tag_list(fleet_tags(self.config, self.fleet, self.expires, str(launch.role)))
        try:
            got = self.aws.call(
                "ec2",
                "create_fleet",
                Type="instant",
                # Unique per attempt; Aws.call's retries of one attempt reuse it, so a
                # retried request never launches twice.
                ClientToken=f"{launch.launch_id}-{launch.attempts}"[:64],
                LaunchTemplateConfigs=[
                    {
                        "LaunchTemplateSpecification": {
                            "LaunchTemplateId": launch.template_id,
                            "Version": "$Latest",
                        },
                        "Overrides": overrides,
                    }
                ],
                TargetCapacitySpecification={
                    "TotalTargetCapacity": wanted,
                    "DefaultTargetCapacityType": "spot",
                },
                SpotOptions={
                    "AllocationStrategy": "capacity-optimized",
                    "InstanceInterruptionBehavior": "terminate",
                },
                TagSpecifications=[
                    {"ResourceType": "fleet", "Tags": tags},
                    {"ResourceType": "instance", "Tags": tags},
                ],
            )
        except CloudError as exc:
            if exc.code in CAPACITY_CODES:
                got = {"Errors": [{"ErrorCode": exc.code, "ErrorMessage": str(exc)}]}
            elif exc.code in QUOTA_CODES or is_quota_code(exc.code):
                launch.stopped = f"an account quota stops more launches: {exc}"
                return
            else:
                raise
        new: list[str] = []
        for item in got.get("Instances", []):
            lt = item.get("LaunchTemplateAndOverrides") or {}
            override = lt.get("Overrides") or {}
            for iid in item.get("InstanceIds", []):
                if iid in launch.members:
                    continue
                launch.members[iid] = Member(
                    instance_id=iid,
                    role=str(launch.role),
                    instance_type=item.get("InstanceType") or override.get("InstanceType", ""),
                    subnet_id=override.get("SubnetId", ""),
                )
                new.append(iid)
        self._errors(launch, got.get("Errors", []), pools)
        if new:
            self.say(f"{launch.role}: launched {len(new)} of {wanted} ({', '.join(new)})")
            self._fill(launch, new)
        if launch.shortfall and not launch.stopped:
            first, cap = self.options.backoff_s
            delay = min(cap, first * 2 ** (launch.attempts - 1)) * random.uniform(0.5, 1.0)
            launch.next_at = self.clock() + delay
            self.say(
                f"{launch.role}: {launch.shortfall} short; asking again in {delay:.1f}s "
                f"from other pools"
            )

    def _errors(self, launch: _Launch, errors: list[dict], pools: list[tuple[str, str]]) -> None:
        now = self.clock()
        fatal = []
        for error in errors:
            code = str(error.get("ErrorCode", ""))
            message = str(error.get("ErrorMessage", ""))
            override = (error.get("LaunchTemplateAndOverrides") or {}).get("Overrides") or {}
            pool = (override.get("InstanceType", ""), override.get("SubnetId", ""))
            where = f"{pool[0]} in {pool[1]}" if pool[0] else "all pools"
            text = f"{code} ({where}): {message}"
            launch.errors.append(text)
            if code in CAPACITY_CODES or code in POOL_UNUSABLE_CODES:
                until = math.inf if code in POOL_UNUSABLE_CODES else now + POOL_COOLDOWN_S
                for p in [pool] if pool[0] else pools:
                    launch.blocked[p] = until
                self.say(f"{launch.role}: {text}")
            elif code in QUOTA_CODES or is_quota_code(code):
                launch.stopped = f"an account quota stops more launches: {text}"
            else:
                fatal.append(text)
        if fatal:
            raise FleetError(
                f"EC2 refused to launch {launch.role} instances: {'; '.join(fatal)}",
                code="CreateFleetError",
            )

    def _fill(self, launch: _Launch, ids: list[str]) -> None:
        """Zone and addresses of new instances (EC2 may not list them yet: later then)."""
        got = self.aws.call(
            "ec2", "describe_instances", InstanceIds=ids, ignore=("InvalidInstanceID.NotFound",)
        )
        for reservation in (got or {}).get("Reservations", []):
            for inst in reservation.get("Instances", []):
                self._update(launch.members.get(inst["InstanceId"]), inst)

    @staticmethod
    def _update(member: Member | None, inst: dict[str, Any]) -> None:
        if member is None:
            return
        member.zone = inst.get("Placement", {}).get("AvailabilityZone", member.zone)
        member.subnet_id = inst.get("SubnetId", member.subnet_id)
        member.instance_type = inst.get("InstanceType", member.instance_type)
        member.public_ip = inst.get("PublicIpAddress", member.public_ip) or ""
        member.private_ip = inst.get("PrivateIpAddress", member.private_ip) or ""

    def refresh(self, launches: list[_Launch]) -> None:
        """Instances that ended before announcing ready are gone: their place is free."""
        self.last_refresh = self.clock()
        by_id = {iid: (lc, m) for lc in launches for iid, m in lc.members.items()}
        waiting = [iid for iid, (_, m) in by_id.items() if m.state in _ACTIVE]
        if not waiting:
            return
        for inst in instances_of(
            self.aws, self.config.name, self.fleet, [*LIVE_STATES, "terminated"]
        ):
            entry = by_id.get(inst["InstanceId"])
            if entry is None:
                continue
            launch, member = entry
            self._update(member, inst)
            state = inst["State"]["Name"]
            if member.state in _ACTIVE and state in (
                "shutting-down",
                "terminated",
                "stopping",
                "stopped",
            ):
                reason = inst.get("StateReason", {}).get("Message", state)
                member.state, member.detail = MemberState.GONE, f"{state}: {reason}"
                self.say(f"{launch.role} {member.instance_id} is {state} ({reason})")

    # -- announcements ------------------------------------------------------------
    def receive(self, wait_s: int) -> list[Announcement]:
        """Announcements of this fleet from the status queue (deleted once read).

        Messages of another live fleet are left for its own ``up``; those of fleets
        with no live instance left (the going-away messages of an earlier ``down``,
        which nobody else reads) and unreadable ones are deleted, so they cannot
        pile up in front of ours.
        """
        got = self.aws.call(
            "sqs",
            "receive_message",
            QueueUrl=self.res["queue_url"],
            MaxNumberOfMessages=10,
            WaitTimeSeconds=max(0, min(20, wait_s)),
        )
        out: list[Announcement] = []
        done = []
        for message in (got or {}).get("Messages", []):
            try:
                announcement = Announcement.from_message(message["Body"])
            except (ValueError, TypeError, KeyError):
                log.warning("dropping an unreadable status message: %.200s", message["Body"])
                done.append(message)
                continue
            if announcement.fleet == self.fleet:
                out.append(announcement)
                done.append(message)
            elif announcement.fleet and self._gone(announcement.fleet):
                done.append(message)
        for message in done:
            self.aws.call(
                "sqs",
                "delete_message",
                QueueUrl=self.res["queue_url"],
                ReceiptHandle=message["ReceiptHandle"],
                ignore=("ReceiptHandleIsInvalid",),
            )
        return out

    def _gone(self, fleet: str) -> bool:
        """True when ``fleet`` (not ours) has no live instance; asked once per fleet."""
        if fleet not in self.other_fleets:
            self.other_fleets[fleet] = not instances_of(self.aws, self.config.name, fleet)
        return self.other_fleets[fleet]

    def on_announcement(self, a: Announcement, to_terminate: list[str]) -> None:
        """Act on an announcement of one of this fleet's own instances, nothing else.

        Anything that may publish to the status topic can write any message, so a
        message counts only when its instance id is one this launch started (from
        CreateFleet, or found by its launch tag, which only a create can set), and
        addresses come from EC2, never from the message.
        """
        launch = next((lc for lc in self.launches if lc.launch_id == a.launch_id), None)
        member = self._member(launch, a) if launch is not None else None
        if launch is None or member is None:
            log.warning(
                "ignoring a %r announcement for %s of launch %s: not an instance this "
                "fleet launched",
                a.event,
                a.instance_id,
                a.launch_id,
            )
            return
        member.zone = a.zone or member.zone
        member.instance_type = a.instance_type or member.instance_type
        if a.event == "up" and member.state is MemberState.LAUNCHED:
            member.state = MemberState.BOOTING
        elif a.event == "ready" and member.state in _ACTIVE:
            member.state = MemberState.READY
            member.host_keys = a.host_keys
            if not member.private_ip:
                self._fill(launch, [member.instance_id])
            if a.private_ip and member.private_ip and a.private_ip != member.private_ip:
                log.warning(
                    "%s announced address %s, EC2 says %s: using EC2's",
                    member.instance_id,
                    a.private_ip,
                    member.private_ip,
                )
        elif a.event == "failed" and member.state is not MemberState.GONE:
            member.state, member.detail = MemberState.FAILED, a.detail
            self.details.append(f"{launch.role} {a.instance_id}: {a.detail}")
            self.say(f"{launch.role} {a.instance_id} failed to boot: {a.detail}")
            to_terminate.append(a.instance_id)
        elif a.event == "going-away" and member.state in _ACTIVE:
            member.state, member.detail = MemberState.GONE, a.detail
            self.say(f"{launch.role} {a.instance_id} is going away: {a.detail}")

    def _member(self, launch: _Launch, a: Announcement) -> Member | None:
        """The member an announcement speaks for, if this launch really started it."""
        member = launch.members.get(a.instance_id)
        if member is not None:
            return member
        if a.instance_id in self.strangers or not re.fullmatch(r"i-[0-9a-f]{8,17}", a.instance_id):
            return None
        # Launched by a retried CreateFleet whose answer was lost: EC2 knows it by tag.
        filters = [
            *fleet_filters(self.config.name, self.fleet),
            {"Name": f"tag:{TAG_LAUNCH}", "Values": [launch.launch_id]},
        ]
        got = self.aws.call(
            "ec2",
            "describe_instances",
            InstanceIds=[a.instance_id],
            Filters=filters,
            ignore=("InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"),
        )
        found = [i for r in (got or {}).get("Reservations", []) for i in r.get("Instances", [])]
        if not found:
            self.strangers.add(a.instance_id)
            return None
        member = launch.members[a.instance_id] = Member(a.instance_id, str(launch.role))
        self._update(member, found[0])
        return member

    def report(self) -> None:
        if self.progress is None:
            return
        for launch in self.launches:
            launched = len(launch.in_state(*_ACTIVE))
            self.progress(str(launch.role), launch.ready, launch.count, launched)

    # -- the loop -----------------------------------------------------------------
    def converge(self, launches: list[_Launch], deadline: float) -> None:
        """Launch shortfalls and read announcements until all are ready or time is up."""
        while True:
            now = self.clock()
            if all(lc.ready >= lc.count for lc in launches) or now >= deadline:
                return
            for launch in launches:
                if launch.shortfall and not launch.stopped and now >= launch.next_at:
                    self.launch(launch)
            if now - self.last_refresh >= REFRESH_INTERVAL_S:
                self.refresh(launches)
            left = deadline - self.clock()
            wait = min(QUEUE_WAIT_S, max(0, math.floor(left)))
            to_terminate: list[str] = []
            got = self.receive(wait)
            if not got and wait == 0:  # the last second: do not spin on the queue
                time.sleep(max(0.0, min(0.2, left)))
            for announcement in got:
                self.on_announcement(announcement, to_terminate)
            if to_terminate:
                _terminate(self.aws, to_terminate)
            self.report()

    def settle(self, launches: list[_Launch]) -> None:
        """At the deadline: terminate what is not ready, so it stops costing money."""
        stragglers = [
            m for lc in launches for m in lc.in_state(MemberState.LAUNCHED, MemberState.BOOTING)
        ]
        for member in stragglers:
            member.detail = f"not ready by the deadline (still {member.state})"
            member.state = MemberState.GONE
        if stragglers:
            ids = [m.instance_id for m in stragglers]
            self.say(
                f"terminating {len(ids)} instance(s) not ready by the deadline: {', '.join(ids)}"
            )
            _terminate(self.aws, ids)
        for launch in launches:
            self.removed.extend(
                m
                for m in launch.members.values()
                if m.state in (MemberState.GONE, MemberState.FAILED)
            )

    def pin_host_keys(self, launches: list[_Launch]) -> Path:
        """Write the fleet's known_hosts file from the host keys its instances announced."""
        members = [m for lc in launches for m in lc.in_state(MemberState.READY)]
        return write_known_hosts(self.fleet, members)

    def fail_if_short(self, launches: list[_Launch], minimum: dict[Role, int]) -> None:
        short = [lc for lc in launches if lc.ready < minimum.get(lc.role, lc.count)]
        if not short:
            return
        parts = []
        for launch in short:
            why = launch.stopped or (launch.errors[-1] if launch.errors else "")
            parts.append(
                f"{launch.ready} of {launch.count} {launch.role} ready "
                f"(at least {minimum.get(launch.role, launch.count)} needed)"
                + (f"; last problem: {why}" if why else "")
            )
        hints = self.details[:5]
        raise FleetNotReadyError(
            f"fleet {self.fleet} is not usable: {'; '.join(parts)}. "
            + (f"Boot failures: {' | '.join(hints)}. " if hints else "")
            + "The fleet was removed; nothing of it is left running. Retry with other "
            "--instance-types, a later --deadline, or a lower --min.",
            fleet=self.fleet,
            ready={str(lc.role): lc.ready for lc in self.launches},
            requested={str(lc.role): lc.count for lc in self.launches},
            details=list(self.details),
        )

    # -- the whole thing ----------------------------------------------------------
    def run(self) -> FleetSummary:
        opts = self.options
        opts.check()
        image, uri, sha, imports = self.prepare()
        deadline = self.clock() + opts.deadline_s
        public = [self.res["public_subnet_id"]]
        inner = public if opts.public_workers else [self.res["private_subnet_id"]]
        self.say(f"fleet {self.fleet}: image {image}, artifact {uri}")
        try:
            if inner != public and self.config.nat == "instance":
                from .account import start_nat

                self.say(
                    "starting the NAT instance (private instances reach SNS and SSM through it)"
                )
                start_nat(self.config, aws=self.aws)
            self.store_password()
            redis = _Launch(Role.REDIS, 1, launch_id(self.fleet, Role.REDIS), public)
            self.launches = [redis]
            self.template(redis, image, self.user_data(redis, uri, sha, imports, None))
            self.report()
            self.converge([redis], deadline)
            self.settle([redis])
            self.fail_if_short([redis], {Role.REDIS: 1})
            node = redis.in_state(MemberState.READY)[0]
            if not node.private_ip:
                self._fill(redis, [node.instance_id])
            if not node.private_ip:
                raise FleetError(
                    f"EC2 lists no private address for the redis node {node.instance_id}",
                    code="NoAddress",
                )
            url = f"redis://{node.private_ip}:{DEFAULT_REDIS_PORT}/0"
            self.say(f"redis node {node.instance_id} is ready at {node.private_ip}")
            second: list[_Launch] = []
            pool = "workers" if opts.distributors else "default"
            if opts.distributors:
                second.append(
                    _Launch(
                        Role.DISTRIBUTOR,
                        opts.distributors,
                        launch_id(self.fleet, Role.DISTRIBUTOR),
                        inner,
                        pool=pool,
                        parent="default",
                    )
                )
            second.append(
                _Launch(
                    Role.WORKER, opts.workers, launch_id(self.fleet, Role.WORKER), inner, pool=pool
                )
            )
            self.launches += second
            for launch in second:
                self.template(launch, image, self.user_data(launch, uri, sha, imports, url))
            self.report()
            self.converge(second, deadline)
            self.settle(second)
            minimum = {
                Role.WORKER: opts.min_workers or 1,
                Role.DISTRIBUTOR: min(1, opts.distributors),
            }
            self.fail_if_short(second, minimum)
            self.pin_host_keys(self.launches)
        except BaseException as exc:
            self.say(f"up failed ({type(exc).__name__}); removing fleet {self.fleet}")
            try:
                down(self.config, self.fleet, aws=self.aws, say=self.say)
            except CloudError as cleanup:
                log.error("cleaning up fleet %s failed: %s", self.fleet, cleanup)
                self.say(
                    f"cleanup failed: {cleanup}; run `pygirder cloud down --fleet {self.fleet}`"
                )
            raise
        members = [m for lc in self.launches for m in lc.in_state(MemberState.READY)]
        prices = spot_prices(self.aws, {(m.instance_type, m.zone) for m in members})
        return FleetSummary(
            fleet=self.fleet,
            name=self.config.name,
            region=self.config.region,
            expires=self.expires,
            members=members,
            removed=self.removed,
            requested={str(lc.role): lc.count for lc in self.launches},
            prices={m.instance_id: prices.get((m.instance_type, m.zone)) for m in members},
        )


def up(
    config: CloudConfig,
    options: UpOptions,
    *,
    aws: Aws | None = None,
    say: Callable[[str], None] | None = None,
    progress: Progress | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> FleetSummary:
    """Launch a fleet: the redis node first, then distributors and workers pointed at it.

    Returns when every requested instance announced ready, or at the deadline with
    at least the minimum ready (stragglers terminated).  With fewer, or on any error
    (Ctrl-C included), the fleet is brought down before the error propagates.
    """
    runner = _Up(config, options, aws or Aws(config), say or (lambda text: None), progress, clock)
    return runner.run()


def _terminate(aws: Aws, ids: list[str]) -> None:
    for start in range(0, len(ids), 500):
        aws.call(
            "ec2",
            "terminate_instances",
            InstanceIds=ids[start : start + 500],
            ignore=("InvalidInstanceID.NotFound",),
        )


# ------------------------------------------------------------ image and artifact


def find_image(config: CloudConfig, *, aws: Aws) -> str:
    """The newest available template image of this setup (``pygirder cloud image build``)."""
    try:
        from .image import latest_image
    except ImportError:  # the image command is not installed: look by tag
        got = aws.call(
            "ec2",
            "describe_images",
            Owners=["self"],
            Filters=[
                *ec2_filters(config.name, "image"),
                {"Name": "state", "Values": ["available"]},
            ],
        )
        images = sorted(got.get("Images", []), key=lambda i: i.get("CreationDate", ""))
        found = images[-1]["ImageId"] if images else None
    else:
        row = latest_image(config, aws=aws)
        found = row["image_id"] if row else None
    if not found:
        raise FleetError(
            f"no pygirder image of {config.name!r} in {config.region}: build one with "
            "`pygirder cloud image build`, or pass --image AMI_ID",
            code="NoImage",
        )
    return found


def resolve_artifact(bucket: str, prefix: str, wanted: str | None) -> tuple[str, str, list[str]]:
    """(URI, SHA-256, top-level modules) of the artifact to run: ``wanted`` (a URI or a
    SHA-256 prefix) or the newest pushed one."""
    from .artifacts import download_artifact, list_artifacts

    found = list_artifacts(bucket, prefix)
    if wanted and wanted.startswith("s3://"):
        chosen = [a for a in found if a["uri"] == wanted]
    elif wanted:
        chosen = [a for a in found if a["sha256"].startswith(wanted.lower())]
    else:
        chosen = found[:1]
    if not chosen:
        what = f"artifact {wanted!r}" if wanted else "artifact"
        raise FleetError(
            f"no {what} in s3://{bucket}/{prefix}: push the project with "
            "`pygirder cloud artifact push`",
            code="NoArtifact",
        )
    if len(chosen) > 1:
        raise FleetError(f"--artifact {wanted!r} matches {len(chosen)} artifacts; give more of it")
    uri, sha = chosen[0]["uri"], chosen[0]["sha256"]
    with tempfile.TemporaryDirectory(prefix="pygirder-manifest-") as tmp:
        bundle = download_artifact(uri, sha, tmp)
        with tarfile.open(bundle, "r:gz") as tar:
            member = tar.extractfile("manifest.json")
            manifest = json.load(io.TextIOWrapper(member)) if member else {}
    return uri, sha, list(manifest.get("modules", []))


# ------------------------------------------------------------------- status, cost


@dataclass
class InstanceRow:
    """One live instance of a fleet, as EC2 and its tags describe it."""

    instance_id: str
    fleet: str
    role: str
    state: str
    instance_type: str
    zone: str
    address: str
    private_ip: str
    public_ip: str
    launched: datetime | None
    expires: datetime | None
    lifecycle: str
    spot_price: float | None = None

    @property
    def uptime_s(self) -> float:
        return (_utcnow() - self.launched).total_seconds() if self.launched else 0.0

    @property
    def cost_usd(self) -> float | None:
        """Cost so far at the current spot price (EC2 bills per second)."""
        if self.spot_price is None:
            return None
        return self.spot_price * self.uptime_s / 3600

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.instance_id,
            "fleet": self.fleet,
            "role": self.role,
            "state": self.state,
            "type": self.instance_type,
            "zone": self.zone,
            "address": self.address,
            "private_ip": self.private_ip,
            "public_ip": self.public_ip,
            "launched": self.launched.isoformat() if self.launched else None,
            "expires": self.expires.isoformat() if self.expires else None,
            "uptime_s": round(self.uptime_s, 1),
            "spot_price": self.spot_price,
            "cost_usd": self.cost_usd,
        }


_ROLE_ORDER = {"redis": 0, "distributor": 1, "worker": 2}


def _row(inst: dict[str, Any]) -> InstanceRow:
    tags = from_tag_list(inst.get("Tags"))
    private = inst.get("PrivateIpAddress", "") or ""
    return InstanceRow(
        instance_id=inst["InstanceId"],
        fleet=tags.get(TAG_FLEET, ""),
        role=tags.get(TAG_ROLE, ""),
        state=inst["State"]["Name"],
        instance_type=inst.get("InstanceType", ""),
        zone=inst.get("Placement", {}).get("AvailabilityZone", ""),
        address=private,
        private_ip=private,
        public_ip=inst.get("PublicIpAddress", "") or "",
        launched=_as_utc(inst.get("LaunchTime")),
        expires=_parse_time(tags.get(TAG_EXPIRES)),
        lifecycle=inst.get("InstanceLifecycle", "on-demand"),
    )


def rows_of(
    aws: Aws, name: str | None, fleet: str | None, *, prices: bool = True
) -> list[InstanceRow]:
    rows = [_row(i) for i in instances_of(aws, name, fleet)]
    if prices and rows:
        found = spot_prices(aws, {(r.instance_type, r.zone) for r in rows})
        for row in rows:
            if row.state in ("running", "pending"):
                row.spot_price = found.get((row.instance_type, row.zone))
            else:
                row.spot_price = 0.0  # stopped or shutting down: no compute charge
    rows.sort(
        key=lambda r: (r.fleet, _ROLE_ORDER.get(r.role, 9), r.launched or _utcnow(), r.instance_id)
    )
    return rows


@dataclass
class FleetStatus:
    fleet: str
    rows: list[InstanceRow]

    @property
    def expires(self) -> datetime | None:
        times = [r.expires for r in self.rows if r.expires]
        return min(times) if times else None

    @property
    def hourly_usd(self) -> float | None:
        prices = [r.spot_price for r in self.rows]
        return None if any(p is None for p in prices) else sum(p or 0.0 for p in prices)

    @property
    def cost_usd(self) -> float | None:
        costs = [r.cost_usd for r in self.rows]
        return None if any(c is None for c in costs) else sum(c or 0.0 for c in costs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fleet": self.fleet,
            "expires": self.expires.isoformat() if self.expires else None,
            "hourly_usd": self.hourly_usd,
            "cost_usd": self.cost_usd,
            "instances": [r.to_dict() for r in self.rows],
        }


def fleet_status(
    config: CloudConfig, fleet: str | None = None, *, aws: Aws | None = None
) -> FleetStatus:
    """The live instances of a fleet with their price and cost so far."""
    aws = aws or Aws(config)
    fleet = resolve_fleet(config, fleet, aws=aws)
    return FleetStatus(fleet, rows_of(aws, config.name, fleet))


def fleet_cost(
    config: CloudConfig, fleet: str | None = None, *, aws: Aws | None = None
) -> dict[str, Any]:
    """Per role: instances, $/hour, cost so far and until expiry; plus the NAT instance."""
    from .pricing import PRICE_INSTANCE_HOUR

    aws = aws or Aws(config)
    status = fleet_status(config, fleet, aws=aws)
    roles: dict[str, dict[str, Any]] = {}
    now = _utcnow()
    for row in status.rows:
        entry = roles.setdefault(
            row.role, {"instances": 0, "hourly_usd": 0.0, "cost_usd": 0.0, "to_expiry_usd": 0.0}
        )
        entry["instances"] += 1
        for key, value in (
            ("hourly_usd", row.spot_price),
            ("cost_usd", row.cost_usd),
            ("to_expiry_usd", _to_expiry(row, now)),
        ):
            entry[key] = None if value is None or entry[key] is None else entry[key] + value
    nat = None
    found = _describe_instances(
        aws,
        [*ec2_filters(config.name, "nat-instance"),
         {"Name": "instance-state-name", "Values": LIVE_STATES}],
    )  # fmt: skip
    if found:
        running = found[0]["State"]["Name"] in ("pending", "running")
        inst_type = found[0].get("InstanceType", config.nat_instance_type)
        nat = {
            "id": found[0]["InstanceId"],
            "state": found[0]["State"]["Name"],
            "hourly_usd": PRICE_INSTANCE_HOUR.get(inst_type) if running else 0.0,
        }
    total = [e["hourly_usd"] for e in roles.values()] + ([nat["hourly_usd"]] if nat else [])
    return {
        "fleet": status.fleet,
        "expires": status.expires.isoformat() if status.expires else None,
        "roles": roles,
        "nat": nat,
        "hourly_usd": None if any(t is None for t in total) else sum(total),
        "cost_usd": status.cost_usd,
    }


def _to_expiry(row: InstanceRow, now: datetime) -> float | None:
    if row.spot_price is None:
        return None
    if row.expires is None:
        return None
    return row.spot_price * max(0.0, (row.expires - now).total_seconds()) / 3600


def dashboard_instances() -> list[dict[str, Any]] | None:
    """The dashboard's fleet section: every live fleet instance of ./pygirder.toml's
    setup, or None when there is no cloud configuration (or no boto3)."""
    from .config import CloudConfigError, load_config

    try:
        config = load_config()
        import boto3  # noqa: F401 - only to know whether the cloud extra is installed
    except (CloudConfigError, ImportError):
        return None
    rows = rows_of(Aws(config), config.name, None, prices=False)
    return [r.to_dict() for r in rows]


# --------------------------------------------------------------- reaching the grid


@dataclass(frozen=True)
class GridNode:
    """The redis node of a fleet, as the other commands need it."""

    instance_id: str
    fleet: str
    address: str
    public_ip: str
    port: int = DEFAULT_REDIS_PORT


def redis_node(config: CloudConfig, fleet: str | None = None, *, aws: Aws) -> GridNode:
    fleet = resolve_fleet(config, fleet, aws=aws)
    nodes = [
        r for r in rows_of(aws, config.name, fleet, prices=False)
        if r.role == "redis" and r.state == "running"
    ]  # fmt: skip
    if not nodes:
        raise NoFleetError(
            f"fleet {fleet} has no running redis node: bring it down with "
            f"`pygirder cloud down --fleet {fleet}` and start another",
            code="NoRedisNode",
        )
    node = nodes[0]
    return GridNode(node.instance_id, fleet, node.address, node.public_ip)


def redis_password(config: CloudConfig, fleet: str, *, aws: Aws) -> str:
    from .agent import redis_password_parameter

    got = aws.call(
        "ssm",
        "get_parameter",
        Name=redis_password_parameter(config.name, fleet),
        WithDecryption=True,
    )
    return str(got["Parameter"]["Value"])


def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# A route gives a local (host, port) that reaches the node's Redis, or None when it
# cannot be used from here.  It is a context manager factory: tunnels close on exit.
Route = Callable[
    [GridNode, CloudConfig, int], contextlib.AbstractContextManager[tuple[str, int]] | None
]


def direct_route(node: GridNode, config: CloudConfig, local_port: int):
    """The node's private address, when this machine can open it (same network)."""
    if not node.address or not reachable(node.address, node.port):
        return None
    return contextlib.nullcontext((node.address, node.port))


def _private_key(config: CloudConfig) -> Path | None:
    """The private half of ``public_key_file`` (the key the instances accept), if here."""
    path = config.public_key_path
    private = path.with_suffix("") if path.suffix == ".pub" else None
    return private if private is not None and private.is_file() else None


def known_hosts_path(fleet: str) -> Path:
    """The known_hosts file that pins the host keys of ``fleet``'s instances."""
    return KNOWN_HOSTS_DIR.expanduser() / check_fleet_id(fleet)


def write_known_hosts(fleet: str, members: Sequence[Member]) -> Path:
    """Pin each member's announced host keys to its EC2 addresses (mode 0600).

    Spot addresses are recycled: an address that was another instance's yesterday is
    this one's today, so SSH must check the key this instance announced, not the one
    it saw first (``accept-new``) or whatever a shared known_hosts holds.
    """
    path = known_hosts_path(fleet)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lines = []
    for member in members:
        hosts = ",".join(h for h in (member.public_ip, member.private_ip) if h)
        if hosts:
            lines.extend(f"{hosts} {key}" for key in member.host_keys)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("".join(f"{line}\n" for line in lines))
    os.chmod(path, 0o600)
    return path


def _ssh_base(config: CloudConfig, fleet: str) -> list[str]:
    """ssh with the fleet's pinned host keys only: an instance whose key was not
    announced, or differs, is refused (StrictHostKeyChecking=yes)."""
    cmd = [
        "ssh",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={known_hosts_path(fleet)}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "ServerAliveInterval=30",
        "-o", "ConnectTimeout=10",
    ]  # fmt: skip
    key = _private_key(config)
    if key is not None:
        cmd += ["-i", str(key)]
    return cmd


@contextlib.contextmanager
def _tunnel(
    command: list[str], port: int, what: str, timeout: float = 30.0
) -> Iterator[tuple[str, int]]:
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while not reachable("127.0.0.1", port, 0.5):
            if proc.poll() is not None:
                err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace")
                raise FleetError(
                    f"{what} failed (exit status {proc.returncode}): {err.strip()[-500:]}"
                )
            if time.monotonic() > deadline:
                raise FleetError(f"{what} did not open local port {port} within {timeout:.0f}s")
            time.sleep(0.2)
        yield ("127.0.0.1", port)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def ssh_route(node: GridNode, config: CloudConfig, local_port: int):
    """``ssh -L`` through the redis node's public address (the security group admits
    SSH from ``ssh_from`` only)."""
    if not node.public_ip or shutil.which("ssh") is None:
        return None
    port = local_port or _free_port()
    command = [
        *_ssh_base(config, node.fleet), "-N", "-o", "ExitOnForwardFailure=yes",
        "-L", f"127.0.0.1:{port}:{node.address}:{node.port}", f"{SSH_USER}@{node.public_ip}",
    ]  # fmt: skip
    return _tunnel(command, port, f"the SSH tunnel to {node.instance_id}")


def ssm_route(node: GridNode, config: CloudConfig, local_port: int):
    """An SSM port forward (``aws ssm start-session``).  Needs the AWS CLI with the
    session-manager-plugin here, ``ssm:StartSession`` for you and Session Manager
    rights for the instance role, which pygirder's least-privilege role does not
    grant: see docs/aws-fleet.md."""
    if shutil.which("aws") is None or shutil.which("session-manager-plugin") is None:
        return None
    port = local_port or _free_port()
    params = {
        "host": [node.address],
        "portNumber": [str(node.port)],
        "localPortNumber": [str(port)],
    }
    command = [
        "aws", "ssm", "start-session", "--region", config.region, "--target", node.instance_id,
        "--document-name", "AWS-StartPortForwardingSessionToRemoteHost",
        "--parameters", json.dumps(params),
    ]  # fmt: skip
    if config.profile:
        command += ["--profile", config.profile]
    return _tunnel(command, port, f"the SSM session to {node.instance_id}")


ROUTES: dict[str, Route] = {"direct": direct_route, "ssh": ssh_route, "ssm": ssm_route}


@contextlib.contextmanager
def grid_url(
    config: CloudConfig,
    fleet: str | None = None,
    *,
    via: str = "auto",
    aws: Aws | None = None,
    routes: Sequence[Route] | None = None,
    local_port: int = 0,
    password: bool = True,
) -> Iterator[str]:
    """``redis://:password@host:port/0`` of a fleet's grid, reachable from here while
    the context lasts.  ``via``: ``auto`` (direct, else SSH, else SSM), or one route;
    ``routes`` replaces the candidates altogether (a rehearsal's own resolution)."""
    from .agent import with_password

    aws = aws or Aws(config)
    node = redis_node(config, fleet, aws=aws)
    if routes is None:
        if via == "auto":
            routes = list(ROUTES.values())
        elif via in ROUTES:
            routes = [ROUTES[via]]
        else:
            raise ConfigError(f"--via {via!r}: expected auto, {', '.join(ROUTES)}")
    secret = redis_password(config, node.fleet, aws=aws) if password else None
    for route in routes:
        opened = route(node, config, local_port)
        if opened is None:
            continue
        with opened as (host, port):
            yield with_password(f"redis://{host}:{port}/0", secret)
        return
    raise FleetError(
        f"cannot reach the redis node {node.instance_id} ({node.address}"
        f"{', public ' + node.public_ip if node.public_ip else ''}) with "
        f"{via if via != 'auto' else 'a direct connection, SSH or SSM'}: check ssh_from "
        "and your SSH key, or use --via",
        code="Unreachable",
    )


# -------------------------------------------------------------------------- exec, ssh


@dataclass
class ExecResult:
    instance_id: str
    role: str
    address: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id, "role": self.role, "address": self.address,
            "returncode": self.returncode, "stdout": self.stdout, "stderr": self.stderr,
            "seconds": round(self.seconds, 3),
        }  # fmt: skip


# Runs ``argv`` on one instance and returns its output.  SSH on AWS; a rehearsal passes
# one that runs the command inside the simulated instance.
Runner = Callable[[InstanceRow, Sequence[str], float], ExecResult]


def ssh_command(
    config: CloudConfig, target: InstanceRow, jump: InstanceRow | None, argv: Sequence[str] = ()
) -> list[str]:
    """The ssh command line for an instance: directly when it has a public address,
    else through ``jump`` (the redis node).  Both hops check the fleet's pinned host
    keys: the jump runs as a ProxyCommand with the same options, because options on
    the command line do not reach a ``-J`` jump host."""
    base = _ssh_base(config, target.fleet)
    cmd = list(base)
    if target.public_ip:
        host = target.public_ip
    else:
        if jump is None or not jump.public_ip:
            raise FleetError(
                f"{target.instance_id} has no public address and the fleet has no public "
                "node to jump through"
            )
        # The jump never prompts: its stdin and stdout carry the connection.
        proxy = [*base, "-o", "BatchMode=yes", "-W", "%h:%p", f"{SSH_USER}@{jump.public_ip}"]
        cmd += ["-o", f"ProxyCommand={shlex.join(proxy)}"]
        host = target.private_ip or target.address
    cmd.append(f"{SSH_USER}@{host}")
    if argv:
        cmd += ["--", " ".join(argv)]  # the remote shell reads it, as ssh does
    return cmd


def ssh_runner(config: CloudConfig, jump: InstanceRow | None) -> Runner:
    def run(row: InstanceRow, argv: Sequence[str], timeout: float) -> ExecResult:
        started = time.monotonic()
        try:
            command = ssh_command(config, row, jump, argv)
        except FleetError as exc:
            return ExecResult(row.instance_id, row.role, row.address, 255, "", str(exc), 0.0)
        command[1:1] = ["-o", "BatchMode=yes"]
        try:
            proc = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, check=False,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
            code, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            code, out, err = (
                124,
                _text(exc.stdout),
                _text(exc.stderr) + f"\ntimed out after {timeout}s",
            )
        return ExecResult(
            row.instance_id, row.role, row.address, code, out, err, time.monotonic() - started
        )

    return run


def _text(value: bytes | str | None) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value or ""


def exec_role(
    config: CloudConfig,
    role: str,
    argv: Sequence[str],
    *,
    fleet: str | None = None,
    aws: Aws | None = None,
    runner: Runner | None = None,
    parallel: int = 16,
    timeout: float = 300.0,
) -> list[ExecResult]:
    """Run ``argv`` on every running instance of ``role`` (``all`` for every role), in
    parallel; one result per instance, in the fleet's order."""
    if not argv:
        raise ConfigError("exec needs a command: pygirder cloud exec ROLE -- CMD ...")
    aws = aws or Aws(config)
    fleet = resolve_fleet(config, fleet, aws=aws)
    rows = [r for r in rows_of(aws, config.name, fleet, prices=False) if r.state == "running"]
    targets = [r for r in rows if role in ("all", r.role)]
    if not targets:
        raise NoFleetError(f"fleet {fleet} has no running {role} instance", code="NoInstance")
    if runner is None:
        jump = next((r for r in rows if r.role == "redis" and r.public_ip), None)
        runner = ssh_runner(config, jump)
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(targets)))) as pool:
        return list(pool.map(lambda row: runner(row, argv, timeout), targets))


def instance_row(
    config: CloudConfig, instance: str, *, aws: Aws
) -> tuple[InstanceRow, InstanceRow | None]:
    """An instance of one of this setup's fleets (by id) and its fleet's jump node."""
    rows = rows_of(aws, config.name, None, prices=False)
    row = next((r for r in rows if r.instance_id == instance), None)
    if row is None:
        raise NoFleetError(f"{instance} is not a live instance of a fleet of {config.name!r}")
    jump = next(
        (r for r in rows if r.fleet == row.fleet and r.role == "redis" and r.public_ip), None
    )
    return row, jump


# --------------------------------------------------------------------------- down


def _find_kind(aws: Aws, kind: str, name: str | None, fleet: str | None) -> list[dict[str, Any]]:
    """Fleet resources of one kind, each ``{"id", "fleet", "name", "created", "state"}``."""
    filters = fleet_filters(name, fleet)
    out: list[dict[str, Any]] = []

    def add(item_id: str, tags: Any, created: Any, state: str = "") -> None:
        t = from_tag_list(tags)
        out.append({
            "id": item_id, "fleet": t.get(TAG_FLEET, ""), "name": t.get(TAG_NAME, ""),
            "created": _as_utc(created), "state": state, "expires": _parse_time(t.get(TAG_EXPIRES)),
        })  # fmt: skip

    if kind == "ec2-fleets":
        for page in aws.pages("ec2", "describe_fleets", Filters=filters):
            for f in page.get("Fleets", []):
                if not str(f.get("FleetState", "")).startswith("deleted"):
                    add(f["FleetId"], f.get("Tags"), f.get("CreateTime"), f.get("FleetState", ""))
    elif kind == "spot-requests":
        got = aws.call(
            "ec2", "describe_spot_instance_requests",
            Filters=[*filters, {"Name": "state", "Values": ["open", "active"]}],
        )  # fmt: skip
        for r in got.get("SpotInstanceRequests", []):
            add(r["SpotInstanceRequestId"], r.get("Tags"), r.get("CreateTime"), r.get("State", ""))
    elif kind == "launch-templates":
        for page in aws.pages("ec2", "describe_launch_templates", Filters=filters):
            for t in page.get("LaunchTemplates", []):
                add(t["LaunchTemplateId"], t.get("Tags"), t.get("CreateTime"))
    elif kind == "volumes":
        for page in aws.pages(
            "ec2", "describe_volumes",
            Filters=[*filters, {"Name": "status", "Values": ["available"]}],
        ):  # fmt: skip
            for v in page.get("Volumes", []):
                add(v["VolumeId"], v.get("Tags"), v.get("CreateTime"), v.get("State", ""))
    elif kind == "instances":
        for inst in _describe_instances(
            aws, [*filters, {"Name": "instance-state-name", "Values": LIVE_STATES}]
        ):
            add(inst["InstanceId"], inst.get("Tags"), inst.get("LaunchTime"), inst["State"]["Name"])
    elif kind == "parameters":
        path = f"/pygirder/{name}" if name else "/pygirder"
        for page in aws.pages("ssm", "get_parameters_by_path", Path=path, Recursive=True):
            for param in page.get("Parameters", []):
                tags = aws.call(
                    "ssm", "list_tags_for_resource", ResourceType="Parameter",
                    ResourceId=param["Name"], ignore=("InvalidResourceId",),
                )  # fmt: skip
                t = from_tag_list((tags or {}).get("TagList"))
                if t.get(TAG_MANAGED) != MANAGED_VALUE or not t.get(TAG_FLEET):
                    continue
                if (name and t.get(TAG_NAME) != name) or (fleet and t.get(TAG_FLEET) != fleet):
                    continue
                add(param["Name"], (tags or {}).get("TagList"), param.get("LastModifiedDate"))
    else:  # pragma: no cover - a programming error
        raise ValueError(kind)
    return out


# What down and sweep remove, in this order; the titles are what the proof shows.
KINDS = {
    "ec2-fleets": "EC2 fleets (active)",
    "spot-requests": "spot requests (open or active)",
    "instances": "instances (not terminated)",
    "volumes": "detached volumes",
    "launch-templates": "launch templates",
    "parameters": "SSM parameters",
}


def _delete(aws: Aws, kind: str, ids: list[str]) -> None:
    if not ids:
        return
    if kind == "ec2-fleets":
        for start in range(0, len(ids), 25):
            aws.call(
                "ec2", "delete_fleets", FleetIds=ids[start : start + 25], TerminateInstances=True
            )
    elif kind == "spot-requests":
        aws.call("ec2", "cancel_spot_instance_requests", SpotInstanceRequestIds=ids)
    elif kind == "instances":
        _terminate(aws, ids)
    elif kind == "volumes":
        for vid in ids:
            aws.call("ec2", "delete_volume", VolumeId=vid, ignore=("InvalidVolume.NotFound",))
    elif kind == "launch-templates":
        for tid in ids:
            aws.call(
                "ec2", "delete_launch_template", LaunchTemplateId=tid,
                ignore=("InvalidLaunchTemplateId.NotFound",),
            )  # fmt: skip
    elif kind == "parameters":
        for start in range(0, len(ids), 10):
            aws.call("ssm", "delete_parameters", Names=ids[start : start + 10])


def _wait_terminated(
    aws: Aws, ids: list[str], timeout: float = 600.0, interval: float = 5.0
) -> None:
    if not ids:
        return

    def gone() -> bool:
        states = []
        for start in range(0, len(ids), 500):
            got = aws.call(
                "ec2", "describe_instances", InstanceIds=ids[start : start + 500],
                ignore=("InvalidInstanceID.NotFound",),
            )  # fmt: skip
            states += [
                i["State"]["Name"]
                for r in (got or {}).get("Reservations", [])
                for i in r["Instances"]
            ]
        return all(s == "terminated" for s in states)

    aws.wait_for(
        gone, what=f"{len(ids)} instance(s) to terminate", timeout=timeout, interval=interval
    )


def fleet_leftovers(
    config: CloudConfig, fleet: str, *, aws: Aws | None = None
) -> dict[str, list[str]]:
    """What of a fleet could still cost money or clutter the account, asked afresh:
    kind -> ids (every list empty means the fleet is gone)."""
    aws = aws or Aws(config)
    return {
        kind: [item["id"] for item in _find_kind(aws, kind, config.name, fleet)] for kind in KINDS
    }


@dataclass
class DownReport:
    fleets: list[str]
    removed: dict[str, list[str]] = field(default_factory=dict)
    nat: str = ""
    leftovers: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.failures and not any(
            ids for left in self.leftovers.values() for ids in left.values()
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "fleets": self.fleets, "removed": self.removed, "nat": self.nat,
            "leftovers": self.leftovers, "failures": self.failures, "clean": self.clean,
        }  # fmt: skip


def down(
    config: CloudConfig,
    fleet: str | None = None,
    *,
    all_fleets: bool = False,
    aws: Aws | None = None,
    say: Callable[[str], None] | None = None,
    stop_nat_instance: bool = True,
    wait_timeout: float = 600.0,
    wait_interval: float = 5.0,
) -> DownReport:
    """Remove a fleet (or every fleet of this setup) by tag, then prove it is gone.

    Without ``fleet``: the only fleet of this setup (``all_fleets``: every one); with
    none left it only makes sure the NAT instance is stopped, so ``down`` can always
    be run again.

    Order: EC2 fleets (with their instances), every instance so tagged, open spot
    requests; wait until terminated; stop the NAT instance unless another fleet still
    runs; then detached volumes, launch templates and SSM parameters of the fleet.
    Failures are collected, not raised, so one stuck resource does not leave the rest.
    """
    aws = aws or Aws(config)
    say = say or (lambda text: None)
    if fleet:
        fleets = [check_fleet_id(fleet)]
    else:
        fleets = list(live_fleets(config, aws=aws))
        for param in _find_kind(aws, "parameters", config.name, None):
            if param["fleet"] not in fleets:
                fleets.append(param["fleet"])
        if len(fleets) > 1 and not all_fleets:
            raise NoFleetError(
                f"{len(fleets)} fleets of {config.name!r} are up ({', '.join(fleets)}): "
                "choose one with --fleet, or bring them all down with --all",
                code="AmbiguousFleet",
            )
    report = DownReport(fleets=fleets)
    for fl in fleets:
        ids: dict[str, list[str]] = {}
        for kind in ("ec2-fleets", "spot-requests", "instances"):
            ids[kind] = [item["id"] for item in _find_kind(aws, kind, config.name, fl)]
        # Spot requests of our instances, tagged or not (EC2 does not always copy tags).
        requests = {
            i.get("SpotInstanceRequestId")
            for i in instances_of(aws, config.name, fl, [*LIVE_STATES, "terminated"])
        }
        ids["spot-requests"] = sorted(set(ids["spot-requests"]) | {r for r in requests if r})
        for kind in ("ec2-fleets", "instances", "spot-requests"):
            if ids[kind]:
                say(f"{fl}: removing {len(ids[kind])} {KINDS[kind].split(' (')[0]}")
            try:
                _delete(aws, kind, ids[kind])
                report.removed.setdefault(kind, []).extend(ids[kind])
            except CloudError as exc:
                report.failures.append(f"{fl} {kind}: {exc}")
        terminated = [
            i["InstanceId"]
            for i in instances_of(aws, config.name, fl, [*LIVE_STATES, "terminated"])
        ]
        try:
            _wait_terminated(aws, terminated, wait_timeout, wait_interval)
        except CloudTimeoutError as exc:
            report.failures.append(f"{fl}: {exc}")
    if stop_nat_instance and config.nat == "instance":
        others = [
            i
            for i in instances_of(aws, config.name)
            if from_tag_list(i.get("Tags")).get(TAG_FLEET) not in fleets
        ]
        if others:
            report.nat = f"left running: {len(others)} instance(s) of other fleets need it"
        else:
            from .account import stop_nat

            try:
                nat = stop_nat(config, aws=aws)
                report.nat = f"stopped ({nat})" if nat else "none"
            except CloudError as exc:
                report.failures.append(f"NAT instance: {exc}")
    for fl in fleets:
        for kind in ("volumes", "launch-templates", "parameters"):
            found = [item["id"] for item in _find_kind(aws, kind, config.name, fl)]
            if found:
                say(f"{fl}: deleting {len(found)} {KINDS[kind]}")
            try:
                _delete(aws, kind, found)
                report.removed.setdefault(kind, []).extend(found)
            except CloudError as exc:
                report.failures.append(f"{fl} {kind}: {exc}")
        report.leftovers[fl] = fleet_leftovers(config, fl, aws=aws)
    return report


# -------------------------------------------------------------------------- sweep


@dataclass
class Orphan:
    kind: str
    id: str
    name: str
    fleet: str
    age_s: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "id": self.id, "name": self.name, "fleet": self.fleet,
            "age_s": round(self.age_s), "reason": self.reason,
        }  # fmt: skip


def find_orphans(
    config: CloudConfig, older_than_s: float, *, aws: Aws | None = None
) -> list[Orphan]:
    """Fleet resources of *any* pygirder setup in the region that nobody will clean up.

    An instance is an orphan once its ``pygirder:expires`` time has passed (its agent
    should have shut it down), or, without that tag, once older than ``older_than_s``.
    Anything else of a fleet is an orphan when the fleet has no live instance left and
    it is older than ``older_than_s`` (younger ones may belong to an ``up`` in progress).
    """
    aws = aws or Aws(config)
    now = _utcnow()
    found = {kind: _find_kind(aws, kind, None, None) for kind in KINDS}
    alive = {
        (item["name"], item["fleet"]) for item in found["instances"]
        if not (item["expires"] and item["expires"] < now)
    }  # fmt: skip
    out = []
    for kind, items in found.items():
        for item in items:
            age = (now - item["created"]).total_seconds() if item["created"] else math.inf
            expired = item["expires"] is not None and item["expires"] < now
            if kind == "instances":
                if expired:
                    reason = f"its time-to-live ran out at {_stamp(item['expires'])}"
                elif item["expires"] is None and age > older_than_s:
                    reason = "no expiry tag and older than the limit"
                else:
                    continue
            elif (item["name"], item["fleet"]) in alive:
                continue
            elif expired or age > older_than_s:
                reason = "its fleet has no live instance"
            else:
                continue
            out.append(Orphan(kind, item["id"], item["name"], item["fleet"], age, reason))
    return out


@dataclass
class SweepReport:
    orphans: list[Orphan]
    deleted: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    dry_run: bool = True


def sweep(
    config: CloudConfig,
    older_than_s: float,
    *,
    yes: bool = False,
    aws: Aws | None = None,
    say: Callable[[str], None] | None = None,
    wait_interval: float = 5.0,
) -> SweepReport:
    """Find orphans (:func:`find_orphans`); with ``yes`` remove them, kind by kind."""
    aws = aws or Aws(config)
    say = say or (lambda text: None)
    orphans = find_orphans(config, older_than_s, aws=aws)
    report = SweepReport(orphans, dry_run=not yes)
    if not yes:
        return report
    for kind in KINDS:
        ids = [o.id for o in orphans if o.kind == kind]
        if not ids:
            continue
        say(f"removing {len(ids)} orphaned {KINDS[kind]}")
        try:
            _delete(aws, kind, ids)
            if kind == "instances":
                _wait_terminated(aws, ids, interval=wait_interval)
            report.deleted += ids
        except CloudError as exc:
            report.failures.append(f"{kind}: {exc}")
    return report
