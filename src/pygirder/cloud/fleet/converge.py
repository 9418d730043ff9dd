"""``up`` on a running fleet: grow or shrink each role to its target, idempotently.

A fleet's target (workers, distributors, the queue-following bounds and the launch
budget) is one JSON SSM parameter, ``/pygirder/<name>/<fleet>/target``, beside the
fleet's Redis password: the operator writes it, the fleet controller on the redis node
reads it, ``pygirder cloud fleet`` shows it against what runs, and ``down`` deletes it
with the rest of the fleet's parameters.

Growing launches the shortfall from the role's own launch template (so the new
instances boot the very user-data of the first ones) with ``up``'s launch loop:
diversified over the target's instance types and the role's subnets, capacity errors
made up from other pools, ready when the agent announces it.  Shrinking drains first
(:mod:`..instance.drain`): the chosen instances' agents SIGTERM their service, a
worker hands back what it holds and exits, the agent records that, and only then is
the instance terminated; an instance that does not confirm within the drain deadline
is terminated anyway (what it held is requeued by liveness, so it is run again, never
lost).  Running it twice with the same sizes changes nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ...errors import ConfigError
from ..aws import Aws
from ..config import CloudConfig
from ..errors import FleetError
from ..instance.announce import fleet_parameter
from ..instance.common import Role
from ..leftovers import terminate
from ..tags import (
    TAG_EXPIRES,
    TAG_ROLE,
    as_utc,
    fleet_filters,
    from_tag_list,
    parse_time,
    utcnow,
)
from .launch import Progress, UpOptions, _Up
from .members import Member, MemberState, RoleLaunch, update
from .naming import (
    DEFAULT_INSTANCE_TYPES,
    check_fleet_id,
    instances_of,
    launch_id,
    put_fleet_parameter,
)
from .redis_node import replace_redis_node

log = logging.getLogger("pygirder.fleet")

# How long a drained instance may take to hand back its work and exit before it is
# terminated anyway; ``PYGIRDER_DRAIN_TIMEOUT_S`` shortens it (tests, rehearsals).
DEFAULT_DRAIN_TIMEOUT_S = 120.0
# Launches per hour the controller allows itself by default, over all roles.
DEFAULT_LAUNCHES_PER_HOUR = 60
DEFAULT_IDLE_S = 600.0


def drain_timeout_s() -> float:
    return float(os.environ.get("PYGIRDER_DRAIN_TIMEOUT_S") or DEFAULT_DRAIN_TIMEOUT_S)


def target_parameter(name: str, fleet: str) -> str:
    return fleet_parameter(name, fleet, "target")


@dataclass
class Target:
    """What a fleet should be; the controller keeps it there."""

    workers: int
    distributors: int = 0
    min_workers: int | None = None
    """With ``max_workers``: follow the queue between these bounds; None: a fixed size."""
    max_workers: int | None = None
    idle_s: float = DEFAULT_IDLE_S
    """Seconds without queued or running calls before scaling down to ``min_workers``."""
    max_launches_per_hour: int = DEFAULT_LAUNCHES_PER_HOUR
    instance_types: tuple[str, ...] = DEFAULT_INSTANCE_TYPES
    max_price: float | None = None
    subnets: dict[str, list[str]] = field(default_factory=dict)
    """Role -> the subnets its instances launch into."""
    controller: bool = False
    """A controller on the redis node keeps this target: ``up`` only writes it and waits."""
    redis_instance_type: str = ""
    """The redis node's type, for its replacement; empty: the config's."""

    def check(self) -> None:
        problems = []
        if self.workers < 0 or self.distributors < 0:
            problems.append("--workers and --distributors cannot be negative")
        if (self.min_workers is None) != (self.max_workers is None):
            problems.append("give both --min-workers and --max-workers, or neither")
        if self.min_workers is not None and self.max_workers is not None:
            if not 0 <= self.min_workers <= self.max_workers:
                problems.append(
                    f"--min-workers ({self.min_workers}) must be between 0 and --max-workers "
                    f"({self.max_workers})"
                )
            elif not self.min_workers <= self.workers <= self.max_workers:
                problems.append(
                    f"--workers ({self.workers}) must lie between --min-workers "
                    f"({self.min_workers}) and --max-workers ({self.max_workers})"
                )
        if self.idle_s <= 0:
            problems.append("--idle-minutes must be positive")
        if self.max_launches_per_hour < 1:
            problems.append("the launch budget needs at least 1 launch per hour")
        if not self.instance_types:
            problems.append("--instance-types needs at least one instance type")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def ceiling(self) -> int:
        """Most workers that may be live at once: the launch budget's bound."""
        return self.max_workers if self.max_workers is not None else self.workers

    def size(self, role: Role | str) -> int:
        return self.distributors if Role(role) is Role.DISTRIBUTOR else self.workers

    def to_json(self) -> str:
        data = asdict(self)
        data["instance_types"] = list(self.instance_types)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Target:
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        data = {k: v for k, v in data.items() if k in known}
        data["instance_types"] = tuple(data.get("instance_types") or DEFAULT_INSTANCE_TYPES)
        return cls(**data)


def read_target(aws: Aws, name: str, fleet: str) -> Target | None:
    got = aws.call(
        "ssm", "get_parameter", Name=target_parameter(name, fleet), ignore=("ParameterNotFound",)
    )
    if not got:
        return None
    try:
        return Target.from_json(got["Parameter"]["Value"])
    except (ValueError, TypeError, KeyError) as exc:
        raise FleetError(
            f"the target of fleet {fleet} ({target_parameter(name, fleet)}) is unreadable: "
            f"{exc}; run `pygirder cloud up --fleet {fleet} --workers N` to write it again",
            code="BadTarget",
        ) from exc


def write_target(aws: Aws, config: CloudConfig, fleet: str, target: Target, expires: datetime):
    """Store the target; the first write tags the parameter as the fleet's."""
    put_fleet_parameter(
        aws, config, fleet, target_parameter(config.name, fleet), target.to_json(),
        description=f"Target size of pygirder fleet {fleet}", expires=expires,
    )  # fmt: skip


# ------------------------------------------------------------------ what runs


@dataclass
class RoleSize:
    """One role of a fleet: what it should have, what it has."""

    role: str
    target: int | None
    live: int
    """Pending or running instances, draining ones included."""
    draining: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def role_sizes(
    aws: Aws, name: str, fleet: str, *, draining: set[str] | None = None
) -> list[RoleSize]:
    """Target against live instances per role (the redis node's target is 1)."""
    target = read_target(aws, name, fleet)
    live: dict[str, list[str]] = {}
    for inst in instances_of(aws, name, fleet, ("pending", "running")):
        role = from_tag_list(inst.get("Tags")).get(TAG_ROLE, "")
        live.setdefault(role, []).append(inst["InstanceId"])
    out = []
    for role in Role:
        ids = live.get(str(role), [])
        wanted: int | None = 1 if role is Role.REDIS else None
        if target is not None and role is not Role.REDIS:
            wanted = target.size(role)
        if not ids and not wanted:
            continue
        out.append(RoleSize(str(role), wanted, len(ids), len(set(ids) & (draining or set()))))
    return out


def role_templates(aws: Aws, name: str, fleet: str) -> dict[str, dict[str, Any]]:
    """Role -> the fleet's launch template of that role (id, tags)."""
    got: dict[str, dict[str, Any]] = {}
    for page in aws.pages("ec2", "describe_launch_templates", Filters=fleet_filters(name, fleet)):
        for template in page.get("LaunchTemplates", []):
            tags = from_tag_list(template.get("Tags"))
            role = tags.get(TAG_ROLE)
            if role:
                got[role] = {"id": template["LaunchTemplateId"], "tags": tags}
    return got


def pick_surplus(instances: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """Which ``count`` instances to remove: not yet running first, then the newest
    (they hold the least work and the least warm cache)."""

    def key(inst: dict[str, Any]) -> tuple[int, float]:
        launched = as_utc(inst.get("LaunchTime"))
        return (0 if inst["State"]["Name"] == "pending" else 1,
                -(launched.timestamp() if launched else 0.0))  # fmt: skip

    return sorted(instances, key=key)[: max(0, count)]


# ------------------------------------------------------------------ draining


class Drainer:
    """Drains instances through the grid's Redis, then terminates them.

    :meth:`start` and :meth:`poll` are the steps (the controller takes one per round);
    :meth:`drain` runs them until every instance has ended.
    """

    def __init__(
        self,
        aws: Aws,
        fleet: str,
        connect: Callable[[], contextlib.AbstractContextManager[Any]] | None,
        say: Callable[[str], None],
        *,
        timeout_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.aws = aws
        self.fleet = fleet
        self.connect = connect
        self.say = say
        self.timeout_s = drain_timeout_s() if timeout_s is None else timeout_s
        self.clock = clock
        self.pending: dict[str, float] = {}
        """Instance id -> when its drain times out."""

    def start(self, client: Any, ids: list[str], reason: str) -> None:
        from ..instance.drain import request_drain

        ids = [iid for iid in ids if iid not in self.pending]
        if not ids:
            return
        request_drain(client, self.fleet, ids, reason)
        self.say(f"draining {len(ids)} instance(s) ({reason}): {', '.join(ids)}")
        deadline = self.clock() + self.timeout_s
        self.pending.update({iid: deadline for iid in ids})

    def poll(self, client: Any) -> dict[str, str]:
        """Terminate what has drained or timed out; instance id -> how it ended."""
        from ..instance.drain import drained, forget

        if not self.pending:
            return {}
        now = self.clock()
        done = set(drained(client, self.fleet)) & set(self.pending)
        late = {iid for iid, until in self.pending.items() if until <= now} - done
        ended = {iid: "drained" for iid in done} | {iid: "drain timed out" for iid in late}
        if done:
            self.say(f"drained: {', '.join(sorted(done))}; terminating")
        if late:
            self.say(
                f"{len(late)} instance(s) did not confirm the drain within "
                f"{self.timeout_s:.0f}s; terminating them (their calls are requeued): "
                + ", ".join(sorted(late))
            )
        if ended:
            terminate(self.aws, sorted(ended))
            forget(client, self.fleet, ended)
            for iid in ended:
                del self.pending[iid]
        return ended

    def drain(self, ids: list[str], reason: str) -> dict[str, str]:
        """Drain and terminate ``ids``; instance id -> how it ended."""
        if not ids:
            return {}
        outcome: dict[str, str] = {}
        with contextlib.ExitStack() as stack:
            try:
                client = stack.enter_context(self.connect()) if self.connect else None
            except FleetError as exc:
                client = None
                self.say(f"cannot reach the grid to drain ({exc}); terminating without a drain")
            if client is None:
                terminate(self.aws, ids)
                return {iid: "terminated without a drain" for iid in ids}
            self.start(client, ids, reason)
            while self.pending:
                outcome.update(self.poll(client))
                if self.pending:
                    time.sleep(0.5)
        return outcome


@contextlib.contextmanager
def grid_client(config: CloudConfig, fleet: str, aws: Aws) -> Iterator[Any]:
    """A Redis client of the fleet's grid while the context lasts (any route)."""
    import redis

    from .access import grid_url

    with grid_url(config, fleet, aws=aws) as url:
        client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        try:
            yield client
        finally:
            client.close()


# ------------------------------------------------------------------ converging


@dataclass
class ConvergeReport:
    """What a converge did, per role."""

    fleet: str
    launched: dict[str, list[str]] = field(default_factory=dict)
    drained: dict[str, str] = field(default_factory=dict)
    """Instance id -> how it ended."""
    sizes: list[RoleSize] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(self.launched.values()) or bool(self.drained)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fleet": self.fleet,
            "launched": self.launched,
            "drained": self.drained,
            "sizes": [s.to_dict() for s in self.sizes],
            "problems": self.problems,
            "changed": self.changed,
        }


class _Converge(_Up):
    """``up``'s launch loop pointed at an existing fleet and its launch templates."""

    def __init__(
        self,
        config: CloudConfig,
        fleet: str,
        target: Target,
        aws: Aws,
        say: Callable[[str], None],
        progress: Progress | None,
        clock: Callable[[], float],
        deadline_s: float,
        expires: datetime,
    ) -> None:
        options = UpOptions(
            workers=max(1, target.workers),
            distributors=target.distributors,
            instance_types=target.instance_types,
            max_price=target.max_price,
            deadline_s=deadline_s,
        )
        super().__init__(config, options, aws, say, progress, clock)
        # New instances join this fleet and keep its expiry (their tags say both).
        self.fleet, self.expires = fleet, expires
        self.capacity.fleet, self.capacity.expires = fleet, expires


def _wait_for_controller(
    aws: Aws, name: str, fleet: str, target: Target, clock: Callable[[], float], wait_s: float
) -> list[RoleSize]:
    """Role sizes once the live instances match ``target`` (or at the deadline)."""
    deadline = clock() + wait_s
    while True:
        sizes = role_sizes(aws, name, fleet)
        if all(s.live == s.target for s in sizes) or clock() >= deadline:
            return sizes
        time.sleep(1.0)


def _expires_of(instances: list[dict[str, Any]], templates: dict[str, dict[str, Any]]):
    times = [parse_time(from_tag_list(i.get("Tags")).get(TAG_EXPIRES)) for i in instances]
    times += [parse_time(t["tags"].get(TAG_EXPIRES)) for t in templates.values()]
    known = [t for t in times if t is not None]
    return min(known) if known else utcnow() + timedelta(hours=1)


def converge(
    config: CloudConfig,
    fleet: str,
    target: Target,
    *,
    aws: Aws | None = None,
    say: Callable[[str], None] | None = None,
    progress: Progress | None = None,
    connect: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    deadline_s: float = 600.0,
    clock: Callable[[], float] = time.monotonic,
) -> ConvergeReport:
    """Grow or shrink the workers and distributors of a running fleet to ``target``.

    The target is stored first, so a fleet controller follows it from then on; then
    each role's shortfall is launched (and waited for until ready, within
    ``deadline_s``) and its surplus drained and terminated.  ``connect`` opens a Redis
    client of the fleet's grid for the drain (default: through :func:`grid_url`).
    A grow that falls short is reported, never a reason to remove the fleet.
    """
    from ..account import account_resources

    aws = aws or Aws(config)
    say = say or (lambda text: None)
    check_fleet_id(fleet)
    target.check()
    instances = instances_of(aws, config.name, fleet, ("pending", "running"))
    templates = role_templates(aws, config.name, fleet)
    redis_lost = not any(from_tag_list(i.get("Tags")).get(TAG_ROLE) == "redis" for i in instances)
    if redis_lost and "redis" not in templates:
        raise FleetError(
            f"fleet {fleet} has no live redis node and no redis launch template to replace "
            f"it from: bring it down with `pygirder cloud down --fleet {fleet}` and start "
            "another",
            code="NoRedisNode",
        )
    if target.distributors and "distributor" not in templates:
        raise ConfigError(
            f"fleet {fleet} was launched without distributors, so its workers serve the "
            "default pool directly: it cannot gain distributors; launch a new fleet with "
            "--distributors"
        )
    res = account_resources(config, aws=aws)
    by_role: dict[str, list[dict[str, Any]]] = {}
    for inst in instances:
        by_role.setdefault(from_tag_list(inst.get("Tags")).get(TAG_ROLE, ""), []).append(inst)
    if not target.subnets:
        target.subnets = {
            role: sorted({i["SubnetId"] for i in insts if i.get("SubnetId")})
            for role, insts in by_role.items()
        }
    for role in ("worker", "distributor"):
        target.subnets.setdefault(role, [res["private_subnet_id"]])
    expires = _expires_of(instances, templates)
    old = read_target(aws, config.name, fleet)
    target.controller = target.controller or bool(old and old.controller)
    target.redis_instance_type = target.redis_instance_type or (
        old.redis_instance_type if old else ""
    )
    write_target(aws, config, fleet, target, expires)
    report = ConvergeReport(fleet)
    runner = _Converge(config, fleet, target, aws, say, progress, clock, deadline_s, expires)
    runner.res = res
    deadline = clock() + deadline_s
    if redis_lost:
        # The controller ran on the lost node: only the operator can bring it back.
        node, _ = replace_redis_node(
            runner, templates["redis"]["id"],
            target.subnets.get("redis") or [res["public_subnet_id"]],
            target.redis_instance_type or config.redis_instance_type, deadline,
        )  # fmt: skip
        report.launched["redis"] = [node]
    if target.controller:
        # Two launchers for one target would each make up the same shortfall.
        say("the fleet's controller converges it; waiting for it")
        report.sizes = _wait_for_controller(aws, config.name, fleet, target, clock, deadline_s)
        settled = {s.role: s.live == s.target for s in report.sizes if s.role != "redis"}
        if not all(settled.values()):
            report.problems.append(
                "the controller has not reached the target within the deadline: "
                + ", ".join(f"{s.role} {s.live} of {s.target}" for s in report.sizes)
            )
        return report

    connect = connect or (lambda: grid_client(config, fleet, aws))
    drainer = Drainer(aws, fleet, connect, say)
    for role in (Role.DISTRIBUTOR, Role.WORKER):
        live = by_role.get(str(role), [])
        wanted = target.size(role)
        if len(live) > wanted:
            victims = pick_surplus(live, len(live) - wanted)
            ids = [v["InstanceId"] for v in victims]
            say(f"{role}: {len(live)} live, target {wanted}: draining {len(ids)}")
            report.drained.update(drainer.drain(ids, f"fleet shrunk to {wanted} {role}s"))
        elif len(live) < wanted:
            template = templates.get(str(role))
            if template is None:
                report.problems.append(f"no launch template for {role}s in fleet {fleet}")
                continue
            launch = RoleLaunch(role, wanted, launch_id(fleet, role), target.subnets[str(role)])
            launch.template_id = template["id"]
            launch.token = f"{launch.launch_id}-{secrets.token_hex(4)}"
            for inst in live:
                member = Member(inst["InstanceId"], str(role), state=MemberState.READY)
                update(member, inst)
                launch.members[member.instance_id] = member
            before = set(launch.members)
            runner.launches = [launch]
            say(f"{role}: {len(live)} live, target {wanted}: launching {wanted - len(live)}")
            runner.converge([launch], deadline)
            runner.settle([launch])
            report.launched[str(role)] = sorted(
                m.instance_id for m in launch.in_state(MemberState.READY)
                if m.instance_id not in before
            )  # fmt: skip
            if launch.ready < wanted:
                why = launch.stopped or (launch.errors[-1] if launch.errors else "")
                report.problems.append(
                    f"{launch.ready} of {wanted} {role}s ready" + (f" ({why})" if why else "")
                )
    gone = set(report.drained)
    report.sizes = role_sizes(aws, config.name, fleet, draining=gone)
    return report
