"""``up``: launch a spot fleet and wait until enough of it announced ``ready``.

``up`` launches with EC2 Fleet of type ``instant`` from one launch template per role,
diversified over instance types and subnets (capacity-optimized).  Capacity errors and
partial fulfilment are normal on spot: the shortfall is asked for again, from pools
that did not just fail, with capped exponential backoff, until the deadline.  An
instance counts as ready when its agent *announces* ``ready`` on the status queue
(matched by the launch id in its user-data), not when EC2 says ``running``: only the
agent knows that the artifact is installed and the service serves.  Stragglers are
terminated at the deadline; too few ready instances is an error that removes the
fleet before it is raised, so a failed ``up`` leaves nothing billable behind.
"""

from __future__ import annotations

import base64
import enum
import logging
import math
import random
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from ...errors import ConfigError
from ..aws import CAPACITY_CODES, LIVE_INSTANCE_STATES, POOL_UNUSABLE_CODES, Aws, is_quota_code
from ..config import CloudConfig
from ..errors import CloudError, FleetError, FleetNotReadyError
from ..instance.announce import Announcement
from ..instance.common import DEFAULT_REDIS_PORT, DEFAULT_SPOT_INTERVAL_S, Role
from ..leftovers import terminate
from ..tags import as_tag_list, fleet_filters
from .access import write_known_hosts
from .inventory import spot_prices
from .naming import (
    DEFAULT_DEADLINE_S,
    DEFAULT_INSTANCE_TYPES,
    DEFAULT_TTL_S,
    TAG_LAUNCH,
    fleet_tags,
    instances_of,
    launch_id,
    new_fleet_id,
    utcnow,
)
from .sources import find_image, resolve_artifact
from .teardown import down

log = logging.getLogger("pygirder.fleet")


# CreateFleet errors are sorted by ``aws.CAPACITY_CODES``, ``aws.POOL_UNUSABLE_CODES``
# and ``aws.is_quota_code``; a pool out of capacity is tried again after this long.
POOL_COOLDOWN_S = 60.0
# How often the launch loop asks EC2 which of its instances died before announcing.
REFRESH_INTERVAL_S = 5.0
# Seconds one receive on the status queue may wait (long polling).
QUEUE_WAIT_S = 2

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
    controller: bool = False
    """Run the fleet controller on the redis node: it keeps the fleet at its target."""
    scale: tuple[int, int] | None = None
    """(fewest, most) workers: the controller follows the queue between them."""
    idle_s: float = 600.0
    """Seconds without queued or running calls before the controller scales down."""
    launches_per_hour: int = 60
    """The controller's launch budget."""

    def check(self) -> None:
        problems = []
        if self.scale is not None:
            low, high = self.scale
            if not 0 <= low <= high or not low <= self.workers <= high:
                problems.append(
                    f"--min-workers ({low}) <= --workers ({self.workers}) <= --max-workers "
                    f"({high}) must hold, with --min-workers at least 0"
                )
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


def instant_fleet(
    aws: Aws,
    *,
    token: str,
    template_id: str,
    pools: list[tuple[str, str]],
    count: int,
    tags: list[dict[str, str]],
    market: str = "spot",
    max_price: float | None = None,
) -> dict[str, Any]:
    """One CreateFleet of type ``instant`` from a launch template over (type, subnet) pools.

    Spot capacity is asked for capacity-optimized and is terminated (not stopped) when
    reclaimed; ``max_price`` caps a spot price.  What EC2 could not launch comes back
    in the answer's ``Errors``, one per pool.
    """
    overrides = []
    for instance_type, subnet in pools:
        override: dict[str, Any] = {"InstanceType": instance_type, "SubnetId": subnet}
        if max_price is not None and market == "spot":
            override["MaxPrice"] = f"{max_price:.5f}"
        overrides.append(override)
    capacity: dict[str, Any] = {
        "SpotOptions": {
            "AllocationStrategy": "capacity-optimized",
            "InstanceInterruptionBehavior": "terminate",
        }
    }
    if market == "on-demand":
        capacity = {"OnDemandOptions": {"AllocationStrategy": "lowest-price"}}
    return aws.call(
        "ec2",
        "create_fleet",
        Type="instant",
        ClientToken=token[:64],
        LaunchTemplateConfigs=[
            {
                "LaunchTemplateSpecification": {
                    "LaunchTemplateId": template_id,
                    "Version": "$Latest",
                },
                "Overrides": overrides,
            }
        ],
        TargetCapacitySpecification={
            "TotalTargetCapacity": count,
            "DefaultTargetCapacityType": market,
        },
        **capacity,
        TagSpecifications=[
            {"ResourceType": "fleet", "Tags": tags},
            {"ResourceType": "instance", "Tags": tags},
        ],
    )


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
        self.expires = utcnow() + timedelta(seconds=options.ttl_s)
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
        from ..account import account_resources

        self.res = account_resources(self.config, aws=self.aws)
        image = self.options.image_id or find_image(self.config, aws=self.aws)
        uri, sha, modules = resolve_artifact(
            self.res["bucket"], self.res["artifact_prefix"], self.options.artifact
        )
        imports = self.options.imports if self.options.imports is not None else tuple(modules)
        return image, uri, sha, imports

    def store_password(self) -> None:
        """The fleet's Redis password, a tagged SecureString only the fleet can read."""
        from ..instance.announce import redis_password_parameter

        self.aws.call(
            "ssm",
            "put_parameter",
            Name=redis_password_parameter(self.config.name, self.fleet),
            Description=f"Redis password of pygirder fleet {self.fleet}",
            Value=secrets.token_urlsafe(32),
            Type="SecureString",
            Tags=as_tag_list(fleet_tags(self.config, self.fleet, self.expires)),
        )

    def store_target(self, launches: list[_Launch]) -> None:
        """The sizes just launched, for ``up`` on this fleet and its controller."""
        from .converge import Target, write_target

        opts = self.options
        low, high = opts.scale if opts.scale is not None else (None, None)
        target = Target(
            workers=opts.workers, distributors=opts.distributors, min_workers=low,
            max_workers=high, idle_s=opts.idle_s, max_launches_per_hour=opts.launches_per_hour,
            instance_types=tuple(opts.instance_types), max_price=opts.max_price,
            subnets={str(lc.role): list(lc.subnet_ids) for lc in launches},
            controller=opts.controller,
        )  # fmt: skip
        write_target(self.aws, self.config, self.fleet, target, self.expires)

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
        from ..instance.userdata import render_user_data

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
            controller_queue_url=(
                self.res["queue_url"]
                if launch.role is Role.REDIS and self.options.controller
                else None
            ),
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
        # The redis node holds the grid: on-demand unless the config says spot.
        on_demand = launch.role is Role.REDIS and self.config.redis_market == "on-demand"
        tags = as_tag_list(fleet_tags(self.config, self.fleet, self.expires, str(launch.role)))
        try:
            # The client token is unique per attempt; Aws.call's retries of one attempt
            # reuse it, so a retried request never launches twice.
            got = instant_fleet(
                self.aws, token=f"{launch.token or launch.launch_id}-{launch.attempts}",
                template_id=launch.template_id, pools=pools, count=wanted, tags=tags,
                market="on-demand" if on_demand else "spot", max_price=self.options.max_price,
            )  # fmt: skip
        except CloudError as exc:
            if exc.code in CAPACITY_CODES:
                got = {"Errors": [{"ErrorCode": exc.code, "ErrorMessage": str(exc)}]}
            elif is_quota_code(exc.code):
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
            elif is_quota_code(code):
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
            self.aws, self.config.name, self.fleet, [*LIVE_INSTANCE_STATES, "terminated"]
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
                terminate(self.aws, to_terminate)
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
            terminate(self.aws, ids)
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
                from ..account import start_nat

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
            self.store_target(second)
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
