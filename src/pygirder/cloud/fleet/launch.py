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

This module is the state machine; :mod:`.members` holds what it tracks,
:mod:`.templates` what the instances boot, and :mod:`.capacity` the spot requests.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from ...errors import ConfigError
from ..aws import LIVE_INSTANCE_STATES, Aws
from ..config import CloudConfig
from ..errors import CloudError, FleetNotReadyError
from ..instance.announce import Announcement
from ..instance.common import DEFAULT_SPOT_INTERVAL_S, Role
from ..leftovers import terminate
from ..tags import fleet_filters
from .access import write_known_hosts
from .capacity import Capacity
from .inventory import spot_prices
from .members import ACTIVE, Member, MemberState, RoleLaunch, fill, update
from .naming import (
    DEFAULT_DEADLINE_S,
    DEFAULT_INSTANCE_TYPES,
    DEFAULT_TTL_S,
    TAG_LAUNCH,
    instances_of,
    launch_id,
    new_fleet_id,
    utcnow,
)
from .redis_node import node_address, write_redis_address
from .sources import images_for, resolve_artifact
from .teardown import down
from .templates import Blueprint

log = logging.getLogger("pygirder.fleet")


# How often the launch loop asks EC2 which of its instances died before announcing.
REFRESH_INTERVAL_S = 5.0
# Seconds one receive on the status queue may wait (long polling).
QUEUE_WAIT_S = 2

# ---------------------------------------------------------------------- up


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
    """An AMI to boot (``--image``) for the roles of its architecture."""
    image_ids: tuple[str, ...] = ()
    """More AMIs, one per architecture; a role whose architecture has none given boots
    the newest image baked for it."""
    redis_instance_type: str | None = None
    """The redis node's type; None: the config's ``redis_instance_type``."""
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
        self.expires = utcnow() + timedelta(seconds=options.ttl_s)
        self.res: dict[str, Any] = {}
        self.launches: list[RoleLaunch] = []
        self.removed: list[Member] = []
        self.details: list[str] = []
        self.last_refresh = 0.0
        self.other_fleets: dict[str, bool] = {}
        self.strangers: set[str] = set()  # instance ids that are not this fleet's
        self.capacity = Capacity(
            aws, config, self.fleet, self.expires, options.instance_types,
            options.max_price, options.backoff_s, say, clock,
        )  # fmt: skip

    # -- preparation --------------------------------------------------------------
    def prepare(self) -> Blueprint:
        """Account resources, image, artifact and imports; fails before creating anything."""
        from ..account import account_resources

        self.res = account_resources(self.config, aws=self.aws)
        opts = self.options
        roles = {str(Role.REDIS): (self.redis_type,), str(Role.WORKER): opts.instance_types}
        given = (*([opts.image_id] if opts.image_id else []), *opts.image_ids)
        images = images_for(self.config, aws=self.aws, roles=roles, given=given)
        image = images[str(Role.WORKER)]
        uri, sha, modules = resolve_artifact(
            self.res["bucket"], self.res["artifact_prefix"], self.options.artifact
        )
        imports = self.options.imports if self.options.imports is not None else tuple(modules)
        return Blueprint(
            self.aws, self.config, self.res, self.fleet, self.expires, image, uri, sha, imports,
            self.options.processes, self.options.spot_interval_s, self.options.controller,
            role_images={str(Role.REDIS): images[str(Role.REDIS)]},
        )  # fmt: skip

    @property
    def redis_type(self) -> str:
        return self.options.redis_instance_type or self.config.redis_instance_type

    def store_target(self, launches: list[RoleLaunch]) -> None:
        """The sizes just launched, for ``up`` on this fleet and its controller."""
        from .converge import Target, write_target

        opts = self.options
        low, high = opts.scale if opts.scale is not None else (None, None)
        target = Target(
            workers=opts.workers, distributors=opts.distributors, min_workers=low,
            max_workers=high, idle_s=opts.idle_s, max_launches_per_hour=opts.launches_per_hour,
            instance_types=tuple(opts.instance_types), max_price=opts.max_price,
            subnets={str(lc.role): list(lc.subnet_ids) for lc in launches},
            controller=opts.controller, redis_instance_type=self.redis_type,
        )  # fmt: skip
        write_target(self.aws, self.config, self.fleet, target, self.expires)

    def refresh(self, launches: list[RoleLaunch]) -> None:
        """Instances that ended before announcing ready are gone: their place is free."""
        self.last_refresh = self.clock()
        by_id = {iid: (lc, m) for lc in launches for iid, m in lc.members.items()}
        waiting = [iid for iid, (_, m) in by_id.items() if m.state in ACTIVE]
        if not waiting:
            return
        for inst in instances_of(
            self.aws, self.config.name, self.fleet, [*LIVE_INSTANCE_STATES, "terminated"]
        ):
            entry = by_id.get(inst["InstanceId"])
            if entry is None:
                continue
            launch, member = entry
            update(member, inst)
            state = inst["State"]["Name"]
            if member.state in ACTIVE and state in (
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
        elif a.event == "ready" and member.state in ACTIVE:
            member.state = MemberState.READY
            member.host_keys = a.host_keys
            if not member.private_ip:
                fill(self.aws, launch, [member.instance_id])
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
        elif a.event == "going-away" and member.state in ACTIVE:
            member.state, member.detail = MemberState.GONE, a.detail
            self.say(f"{launch.role} {a.instance_id} is going away: {a.detail}")

    def _member(self, launch: RoleLaunch, a: Announcement) -> Member | None:
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
        update(member, found[0])
        return member

    def report(self) -> None:
        if self.progress is None:
            return
        for launch in self.launches:
            launched = len(launch.in_state(*ACTIVE))
            self.progress(str(launch.role), launch.ready, launch.count, launched)

    # -- the loop -----------------------------------------------------------------
    def converge(self, launches: list[RoleLaunch], deadline: float) -> None:
        """Launch shortfalls and read announcements until all are ready or time is up."""
        while True:
            now = self.clock()
            if all(lc.ready >= lc.count for lc in launches) or now >= deadline:
                return
            for launch in launches:
                if launch.shortfall and not launch.stopped and now >= launch.next_at:
                    self.capacity.request(launch)
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

    def settle(self, launches: list[RoleLaunch]) -> None:
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

    def pin_host_keys(self, launches: list[RoleLaunch]) -> Path:
        """Write the fleet's known_hosts file from the host keys its instances announced."""
        members = [m for lc in launches for m in lc.in_state(MemberState.READY)]
        return write_known_hosts(self.fleet, members)

    def fail_if_short(self, launches: list[RoleLaunch], minimum: dict[Role, int]) -> None:
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
        blueprint = self.prepare()
        deadline = self.clock() + opts.deadline_s
        public = [self.res["public_subnet_id"]]
        inner = public if opts.public_workers else [self.res["private_subnet_id"]]
        self.say(
            f"fleet {self.fleet}: image {blueprint.image_id}, artifact {blueprint.artifact_uri}"
        )
        try:
            if inner != public and self.config.nat == "instance":
                from ..account import start_nat

                self.say(
                    "starting the NAT instance (private instances reach SNS and SSM through it)"
                )
                start_nat(self.config, aws=self.aws)
            blueprint.store_password()
            if opts.controller:
                from .controller_role import controller_role_name, create_controller_role

                self.say(f"creating {controller_role_name(self.config.name, self.fleet)}")
                blueprint.redis_profile_arn = create_controller_role(
                    self.aws, self.config, self.res, self.fleet, self.expires
                )
            redis = RoleLaunch(Role.REDIS, 1, launch_id(self.fleet, Role.REDIS), public,
                               instance_types=(self.redis_type,))  # fmt: skip
            self.launches = [redis]
            blueprint.template(redis, None)
            self.report()
            self.converge([redis], deadline)
            self.settle([redis])
            self.fail_if_short([redis], {Role.REDIS: 1})
            node = redis.in_state(MemberState.READY)[0]
            url = node_address(self.aws, redis, node)
            write_redis_address(self.aws, self.config, self.fleet, url, self.expires)
            self.say(f"redis node {node.instance_id} is ready at {node.private_ip}")
            second: list[RoleLaunch] = []
            pool = "workers" if opts.distributors else "default"
            if opts.distributors:
                second.append(
                    RoleLaunch(
                        Role.DISTRIBUTOR,
                        opts.distributors,
                        launch_id(self.fleet, Role.DISTRIBUTOR),
                        inner,
                        pool=pool,
                        parent="default",
                    )
                )
            second.append(
                RoleLaunch(
                    Role.WORKER, opts.workers, launch_id(self.fleet, Role.WORKER), inner, pool=pool
                )
            )
            self.launches += second
            for launch in second:
                blueprint.template(launch, url)
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
