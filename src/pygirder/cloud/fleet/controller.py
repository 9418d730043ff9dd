"""The fleet controller: keeps a running fleet at its target while nobody watches.

It runs on the fleet's redis node, as a second service the agent supervises there (as
Ray's autoscaler runs on the head node), with the credentials of the redis node's
instance role, which :func:`controller_policy` scopes to this one fleet.  Every
``PYGIRDER_CONTROLLER_INTERVAL_S`` seconds (10 by default) it takes one round:

1. **read** the target (:mod:`.converge`'s SSM parameter; ``up`` rewrites it), the
   fleet's live instances (EC2, by tag) and the status queue: a ``going-away``
   announcement of one of them (spot interruption notice, time-to-live) makes it
   *leaving*, so its replacement starts before EC2 takes it back; a ``rebalance``
   announcement (EC2's rebalance recommendation) makes it *at risk*: replaced first,
   drained once enough of the others serve (their ``ready`` announcement); one that
   announced a ``failed`` boot is terminated (it would wait for its time-to-live), as
   is one launched here that has not announced ``ready`` within ``boot_timeout_s``;
2. **decide** the workers wanted: the target, or, when the target follows the queue
   (``min_workers``/``max_workers``), enough for the calls queued, on workers' stacks
   and running, and ``min_workers`` once there has been none for ``idle_s``;
3. **launch** the shortfall from the role's launch template, spread over the pools
   (instance type x subnet) that hold fewest of the fleet's instances; a pool that
   answers with a capacity error is left alone for a while that doubles with each
   failure (Karpenter's unavailable-offerings cache, kept per pool rather than
   forgotten all at once, so launches do not ping-pong between two empty pools);
4. **drain** the surplus (newest first) and terminate what has drained.

A **launch budget** bounds what a confused controller can cost: never more than
``target.ceiling`` workers live (``max_workers``, else ``workers``; an instance that
announced it is going away or at risk may be replaced before it is gone, one for one), and
never more than ``max_launches_per_hour`` launches in any hour.  What stops a launch
is reported, in the controller's log and in its status in the grid's Redis
(``pygirder:fleet:{<fleet>}:controller``).  Announcements are trusted only for
instances EC2 lists as this fleet's.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer

from ...service import ServiceContext, service
from ..aws import CAPACITY_CODES, POOL_UNUSABLE_CODES, Aws, is_quota_code
from ..config import CloudConfig
from ..errors import CloudError
from ..instance.announce import Announcement
from ..instance.common import Role
from ..leftovers import terminate
from ..policy import POLICY_VERSION, partition
from ..tags import TAG_FLEET, TAG_MANAGED, TAG_ROLE, as_tag_list, from_tag_list, parse_time, utcnow
from .capacity import DEFAULT_POOL_BACKOFF_S, Pool, PoolBook, instant_fleet
from .converge import Drainer, Target, pick_surplus, read_target, role_templates
from .naming import fleet_tags, instances_of

log = logging.getLogger("pygirder.controller")

DEFAULT_INTERVAL_S = 10.0
# An instance that announced going-away and is still running after this long was not
# reclaimed after all (or the message was not true): it counts again.
LEAVING_GRACE_S = 180.0
# An instance launched here that has not announced ``ready`` this long after its launch
# is a hung boot: it is terminated and replaced (``PYGIRDER_BOOT_TIMEOUT_S``).
DEFAULT_BOOT_TIMEOUT_S = 600.0
ROLES = (Role.DISTRIBUTOR, Role.WORKER)
# The pools of a fleet's grid: ``default``, and ``workers`` below distributors.
FLEET_POOLS = ("default", "workers")


def _env_float(name: str, default: float) -> float:
    """Every environment variable of the controller is read here."""
    value = os.environ.get(name)
    return float(value) if value else default


def status_key(fleet: str) -> str:
    return f"pygirder:fleet:{{{fleet}}}:controller"


class LaunchBudget:
    """At most ``per_hour`` instances launched in any 3600 s."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.times: deque[float] = deque()

    def used(self) -> int:
        now = self.clock()
        while self.times and self.times[0] <= now - 3600.0:
            self.times.popleft()
        return len(self.times)

    def left(self, per_hour: int) -> int:
        return max(0, per_hour - self.used())

    def record(self, count: int) -> None:
        now = self.clock()
        self.times.extend([now] * count)


@dataclass
class Round:
    """What one round saw and did (also the controller's published status)."""

    time: float
    target: dict[str, int] = field(default_factory=dict)
    live: dict[str, int] = field(default_factory=dict)
    leaving: list[str] = field(default_factory=list)
    at_risk: list[str] = field(default_factory=list)
    """Instances EC2 recommended rebalancing: replaced, then drained."""
    booting: list[str] = field(default_factory=list)
    """Instances launched by the controller that have not announced ``ready`` yet."""
    launched: dict[str, list[str]] = field(default_factory=dict)
    drained: dict[str, str] = field(default_factory=dict)
    draining: list[str] = field(default_factory=list)
    queue: dict[str, int] = field(default_factory=dict)
    limits: list[str] = field(default_factory=list)
    """Why a launch was smaller than the shortfall (budget, quota, all pools backing off)."""
    errors: list[str] = field(default_factory=list)
    launches_last_hour: int = 0
    pools: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def grid_demand(client: Any, namespace: str = "default") -> dict[str, int]:
    """What the grid asks of the workers: queued calls, calls waiting on workers' own
    stacks, busy and live worker processes.

    A worker runs its sub-calls depth first from its own stack and offers them to the
    pool only while some worker of the pool is idle, so a fanned-out job on busy
    workers queues nothing: the stacks (each worker's registration says how deep its
    stack is) are what more workers could take.  Distributors register beside the
    workers but run no calls: they are left out.
    """
    import json as json_

    from ...store.keys import Keys

    keys = Keys(namespace)
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.workers)
    for pool in FLEET_POOLS:
        pipe.llen(keys.queue(pool))
        pipe.hkeys(keys.idle(pool))
    raw, *replies = pipe.execute()
    queued = sum(int(n) for n in replies[0::2])
    idle = {(k.decode() if isinstance(k, bytes) else str(k)) for ks in replies[1::2] for k in ks}
    workers: dict[str, int] = {}  # worker id -> entries on its stack
    for key, value in raw.items():
        try:
            info = json_.loads(value)
        except ValueError:
            continue
        if isinstance(info, dict) and info.get("kind") != "distributor":
            stack = info.get("stack")
            depth = stack if isinstance(stack, int) and stack > 0 else 0
            workers[key.decode() if isinstance(key, bytes) else str(key)] = depth
    pipe = client.pipeline(transaction=False)
    for worker in workers:
        pipe.exists(keys.heartbeat(worker))
    alive = [w for w, up in zip(workers, pipe.execute(), strict=True) if up]
    busy = sum(1 for w in alive if w not in idle)
    stacked = sum(workers[w] for w in alive)
    return {"queued": queued, "stacked": stacked, "busy": busy, "alive": len(alive)}


class Controller:
    """One fleet's controller; :meth:`step` is one round, :meth:`run` loops."""

    def __init__(
        self,
        config: CloudConfig,
        fleet: str,
        *,
        aws: Aws,
        queue_url: str | None,
        grid: Any | None,
        clock: Callable[[], float] = time.monotonic,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.fleet = fleet
        self.aws = aws
        self.queue_url = queue_url
        self.grid = grid
        self.clock = clock
        self.say = say or (lambda text: log.info("%s", text))
        self.pools = PoolBook(_env_float("PYGIRDER_POOL_BACKOFF_S", DEFAULT_POOL_BACKOFF_S))
        self.budget = LaunchBudget(clock)
        self.drainer = Drainer(aws, fleet, None, self.say, clock=clock)
        self.leaving: dict[str, tuple[float, str]] = {}
        """Instance id -> (when it announced going-away, why)."""
        self.at_risk: dict[str, tuple[float, str]] = {}
        """Instance id -> (when it announced a rebalance recommendation, its detail)."""
        self.launched: dict[str, float | None] = {}
        """Instances this controller launched -> when they announced ``ready`` (None: not yet)."""
        self.boot_timeout_s = _env_float("PYGIRDER_BOOT_TIMEOUT_S", DEFAULT_BOOT_TIMEOUT_S)
        self.boot_deadline: dict[str, float] = {}
        """Instances launched here that have not announced ``ready`` -> until when they may."""
        self.idle_since: float | None = None
        self.failed: set[str] = set()
        """Instances terminated after announcing a failed boot."""
        self.rounds = 0
        self.stopped = threading.Event()

    # -- reading ---------------------------------------------------------------------
    def _announcements(self, ours: set[str]) -> None:
        """Going-away announcements of this fleet's live instances mark them leaving,
        rebalance ones at risk, ``ready`` ones of instances launched here serving.

        Other messages are left on the queue (visible again in a moment) for whoever
        reads them: ``up`` waits there for its instances' ``ready``.
        """
        if not self.queue_url:
            return
        got = self.aws.call(
            "sqs", "receive_message", QueueUrl=self.queue_url, MaxNumberOfMessages=10,
            WaitTimeSeconds=0, VisibilityTimeout=2,
        )  # fmt: skip
        for message in (got or {}).get("Messages", []):
            try:
                a = Announcement.from_message(message["Body"])
            except (ValueError, TypeError, KeyError):
                continue
            if a.fleet != self.fleet:
                continue
            if a.event in ("up", "ready"):
                if a.instance_id not in self.launched:
                    continue  # one of `up`'s own launches: `up` waits for it
                if a.event == "ready" and self.launched[a.instance_id] is None:
                    self.launched[a.instance_id] = self.clock()
                    self.boot_deadline.pop(a.instance_id, None)
            elif a.event not in ("going-away", "failed", "rebalance"):
                continue
            if a.event == "failed" and a.instance_id in ours:
                # A broken boot waits for its time-to-live for inspection; here it would
                # count as live and never be replaced: it is terminated instead.
                self.say(f"{a.role} {a.instance_id} failed to boot ({a.detail}): replacing it")
                terminate(self.aws, [a.instance_id])
                self.failed.add(a.instance_id)
            drained = a.detail.startswith("drained")  # asked for by a shrink: not a loss
            if (a.event == "going-away" and not drained and a.instance_id in ours
                    and a.instance_id not in self.leaving):  # fmt: skip
                self.leaving[a.instance_id] = (self.clock(), a.detail)
                self.at_risk.pop(a.instance_id, None)
                self.say(f"{a.role} {a.instance_id} is going away ({a.detail}): replacing it")
            if (a.event == "rebalance" and a.instance_id in ours and a.role in ROLES
                    and a.instance_id not in self.leaving
                    and a.instance_id not in self.at_risk):  # fmt: skip
                self.at_risk[a.instance_id] = (self.clock(), a.detail)
                self.say(f"{a.role} {a.instance_id} is at risk ({a.detail}): replacing it first")
            self.aws.call(
                "sqs", "delete_message", QueueUrl=self.queue_url,
                ReceiptHandle=message["ReceiptHandle"], ignore=("ReceiptHandleIsInvalid",),
            )  # fmt: skip

    def _resume(self) -> None:
        """A restarted controller takes over the at-risk instances and the replacements
        not yet serving of the last status: the controller before it read (and deleted)
        their announcements."""
        if self.grid is None:
            return
        try:
            last = json.loads(self.grid.get(status_key(self.fleet)) or "{}")
        except Exception as exc:  # no status, or no grid yet: nothing to take over
            log.debug("no earlier status to resume from: %s", exc)
            return
        if not isinstance(last, dict):
            return
        for key, ids in (("at_risk", last.get("at_risk")), ("booting", last.get("booting"))):
            for iid in ids if isinstance(ids, list) else []:
                if not isinstance(iid, str):
                    continue
                if key == "at_risk":
                    self.at_risk.setdefault(iid, (self.clock(), "at risk before a restart"))
                else:
                    self.launched.setdefault(iid, None)
                    self.boot_deadline.setdefault(iid, self.clock() + self.boot_timeout_s)

    def _hung_boots(self, ours: set[str]) -> None:
        """Terminate instances launched here that never announced ``ready``: a hung boot
        would hold a place of the fleet (and keep an at-risk instance) forever."""
        now = self.clock()
        for iid, deadline in list(self.boot_deadline.items()):
            if iid in ours and now < deadline:
                continue
            del self.boot_deadline[iid]
            if iid in ours:
                self.say(
                    f"{iid} has not announced ready {self.boot_timeout_s:.0f}s after its "
                    "launch: terminating it (it is replaced)"
                )
                terminate(self.aws, [iid])
                self.failed.add(iid)

    def _queue(self) -> dict[str, int] | None:
        """Queued and stacked calls, busy and live worker processes (:func:`grid_demand`);
        None when the grid is unreadable."""
        if self.grid is None:
            return None
        try:
            return grid_demand(self.grid)
        except Exception as exc:  # a grid that cannot be read must not stop replacement
            log.warning("cannot read the grid's queue: %s", exc)
            return None

    def wanted_workers(
        self, target: Target, live: int, queue: dict[str, int] | None, instances: int | None = None
    ) -> int:
        """Workers wanted now: the target, or what the queue needs between min and max.

        ``live`` counts the instances that stay, ``instances`` every one whose worker
        processes may be registered (those going away too; default ``live``).
        """
        if target.min_workers is None or target.max_workers is None:
            return target.workers
        now = self.clock()
        if queue is None:  # blind: keep what runs, within the bounds
            return min(max(live, target.min_workers), target.max_workers)
        demand = queue["queued"] + queue.get("stacked", 0) + queue["busy"]
        if demand == 0:
            if self.idle_since is None:
                self.idle_since = now
            if now - self.idle_since >= target.idle_s:
                return target.min_workers
            return min(max(live, target.min_workers), target.max_workers)
        self.idle_since = None
        # Worker processes per instance, as measured over every instance whose processes
        # are counted (those going away too); one until there is a measure.
        instances = live if instances is None else instances
        per_instance = max(1, queue["alive"] // instances) if instances else 1
        need = math.ceil(demand / per_instance)
        return min(target.max_workers, max(target.min_workers, live, need))

    # -- acting ----------------------------------------------------------------------
    def _launch(
        self,
        role: Role,
        count: int,
        template_id: str,
        target: Target,
        subnets: Sequence[str],
        live: list[dict[str, Any]],
        result: Round,
    ) -> list[str]:
        """One CreateFleet for ``count`` instances over the usable pools, spread out."""
        now = self.clock()
        every = [(t, s) for t in target.instance_types for s in subnets]
        usable = self.pools.usable(every, now)
        if not usable:
            result.limits.append(f"{role}: every pool is backing off after capacity errors")
            return []
        held: dict[Pool, int] = {}
        for inst in live:
            key = (inst.get("InstanceType", ""), inst.get("SubnetId", ""))
            held[key] = held.get(key, 0) + 1
        usable.sort(key=lambda p: (held.get(p, 0), random.random()))
        expires = parse_time(
            from_tag_list(live[0].get("Tags")).get("pygirder:expires") if live else None
        )
        try:
            got = instant_fleet(
                self.aws, token=f"{self.fleet}-{role}-c{secrets.token_hex(6)}",
                template_id=template_id, pools=usable, count=count,
                tags=self._tags(role, expires), max_price=target.max_price,
            )  # fmt: skip
        except CloudError as exc:
            if exc.code in CAPACITY_CODES or exc.code in POOL_UNUSABLE_CODES:
                got = {"Errors": [{"ErrorCode": exc.code, "ErrorMessage": str(exc)}]}
            elif is_quota_code(exc.code):
                result.limits.append(f"{role}: an account quota stops launches: {exc}")
                return []
            else:
                result.errors.append(f"{role}: CreateFleet failed: {exc}")
                return []
        new: list[str] = []
        for item in got.get("Instances", []):
            override = (item.get("LaunchTemplateAndOverrides") or {}).get("Overrides") or {}
            pool = (item.get("InstanceType") or override.get("InstanceType", ""),
                    override.get("SubnetId", ""))  # fmt: skip
            self.pools.succeeded(pool)
            new.extend(item.get("InstanceIds", []))
        for error in got.get("Errors", []):
            code = str(error.get("ErrorCode", ""))
            message = str(error.get("ErrorMessage", ""))
            override = (error.get("LaunchTemplateAndOverrides") or {}).get("Overrides") or {}
            pools = (
                [(override.get("InstanceType", ""), override.get("SubnetId", ""))]
                if override.get("InstanceType")
                else usable
            )
            if code in CAPACITY_CODES or code in POOL_UNUSABLE_CODES:
                for pool in pools:
                    wait = self.pools.failed(pool, code, message, now)
                    self.say(f"{role}: {code} in {pool[0]}/{pool[1]}; leaving it {wait:.0f}s")
            elif is_quota_code(code):
                result.limits.append(f"{role}: an account quota stops launches: {message}")
            else:
                result.errors.append(f"{role}: {code}: {message}")
        self.budget.record(len(new))
        self.launched.update(dict.fromkeys(new))
        self.boot_deadline.update(dict.fromkeys(new, now + self.boot_timeout_s))
        if new:
            self.say(f"{role}: launched {len(new)} of {count}: {', '.join(new)}")
        return new

    def _tags(self, role: Role, expires: Any) -> list[dict[str, str]]:
        from datetime import timedelta

        when = expires or utcnow() + timedelta(hours=1)
        return as_tag_list(fleet_tags(self.config, self.fleet, when, str(role)))

    # -- one round -------------------------------------------------------------------
    def step(self) -> Round:
        now = self.clock()
        self.rounds += 1
        result = Round(time=time.time())
        if self.rounds == 1:
            self._resume()
        target = read_target(self.aws, self.config.name, self.fleet)
        instances = instances_of(self.aws, self.config.name, self.fleet, ("pending", "running"))
        ours = {i["InstanceId"] for i in instances}
        self._announcements(ours)
        self._hung_boots(ours)
        ours -= self.failed
        # Leaving instances that EC2 took are gone; those still up after the grace count.
        self.leaving = {
            iid: (when, why) for iid, (when, why) in self.leaving.items()
            if iid in ours and now - when < LEAVING_GRACE_S
        }  # fmt: skip
        result.leaving = sorted(self.leaving)
        # At-risk instances EC2 took (or that started to drain) need nothing more.
        self.at_risk = {
            iid: seen for iid, seen in self.at_risk.items()
            if iid in ours and iid not in self.drainer.pending
        }  # fmt: skip
        self.launched = {iid: ready for iid, ready in self.launched.items() if iid in ours}
        if self.grid is not None and self.drainer.pending:
            result.drained = self.drainer.poll(self.grid)
            ours -= set(result.drained)
        if target is None:
            result.errors.append("no target stored for this fleet: nothing to keep")
            return self._publish(result)
        roles = {from_tag_list(i.get("Tags")).get(TAG_ROLE) for i in instances}
        if str(Role.REDIS) not in roles:
            # The redis node is shutting down (`down`, its time-to-live, a reclaim): the
            # grid goes with it, so nothing is replaced, or `down` would race new launches.
            result.errors.append("the redis node is going away: the fleet is not kept")
            return self._publish(result)
        queue = self._queue()
        if queue is not None:
            result.queue = queue
        templates = role_templates(self.aws, self.config.name, self.fleet)
        for role in ROLES:
            mine = [
                i for i in instances
                if from_tag_list(i.get("Tags")).get(TAG_ROLE) == str(role)
                and i["InstanceId"] in ours
            ]  # fmt: skip
            going = set(self.leaving) | set(self.drainer.pending) | set(self.at_risk)
            staying = [i for i in mine if i["InstanceId"] not in going]
            if role is Role.WORKER:
                wanted = self.wanted_workers(target, len(staying), queue, len(mine))
                ceiling = target.ceiling
            else:
                wanted = ceiling = target.distributors
                if not wanted and not mine:
                    continue
            result.target[str(role)] = wanted
            result.live[str(role)] = len(staying)
            self._retire(role, mine, staying, wanted, result)
            if len(staying) > wanted:
                self._shrink(role, staying, wanted, result)
            elif len(staying) < wanted:
                template = templates.get(str(role))
                if template is None:
                    result.errors.append(f"{role}: the fleet has no launch template for it")
                    continue
                # At most the ceiling live, plus one per instance that is going away.
                away = set(self.leaving) | set(self.at_risk)
                leaving = sum(1 for i in mine if i["InstanceId"] in away)
                room = ceiling + leaving - len(mine)
                left = self.budget.left(target.max_launches_per_hour)
                count = min(wanted - len(staying), room, left)
                if count < wanted - len(staying):
                    if left < wanted - len(staying):
                        result.limits.append(
                            f"{role}: launch budget: {self.budget.used()} launches in the last "
                            f"hour (at most {target.max_launches_per_hour})"
                        )
                    if room < wanted - len(staying):
                        result.limits.append(
                            f"{role}: launch budget: {len(mine)} live (at most {ceiling}, "
                            f"{leaving} going away)"
                        )
                if count > 0:
                    subnets = target.subnets.get(str(role)) or sorted(
                        {i["SubnetId"] for i in mine if i.get("SubnetId")}
                    )
                    if not subnets:
                        result.errors.append(f"{role}: no subnet known to launch into")
                        continue
                    new = self._launch(role, count, template["id"], target, subnets, mine, result)
                    if new:
                        result.launched[str(role)] = new
        result.draining = sorted(self.drainer.pending)
        result.at_risk = sorted(self.at_risk)
        result.booting = sorted(iid for iid, ready in self.launched.items() if ready is None)
        result.launches_last_hour = self.budget.used()
        for line in result.limits:
            log.warning("%s", line)
        for line in result.errors:
            log.error("%s", line)
        return self._publish(result)

    def _retire(
        self,
        role: Role,
        mine: list[dict[str, Any]],
        staying: list[dict[str, Any]],
        wanted: int,
        result: Round,
    ) -> None:
        """Drain the at-risk instances that serving ones have replaced, oldest first.

        An instance launched here serves once it announced ``ready``; the others (``up``
        waited for theirs) serve already.  At-risk instances keep serving until then,
        so the role never has fewer than ``wanted`` serving.
        """
        risky = sorted(
            (i["InstanceId"] for i in mine if i["InstanceId"] in self.at_risk),
            key=lambda iid: self.at_risk[iid][0],
        )
        if not risky:
            return
        serving = sum(1 for i in staying if self.launched.get(i["InstanceId"], 0.0) is not None)
        victims = risky[: max(0, serving + len(risky) - wanted)]
        if not victims:
            return
        if self.grid is None:
            result.errors.append(f"{role}: cannot drain without the grid's Redis")
            return
        try:
            self.drainer.start(self.grid, victims, "replaced after a rebalance recommendation")
        except Exception as exc:  # redis down: try again next round
            result.errors.append(f"{role}: cannot request a drain: {exc}")
            return
        for iid in victims:
            del self.at_risk[iid]

    def _shrink(self, role: Role, staying: list[dict[str, Any]], wanted: int, result: Round):
        if self.grid is None:
            result.errors.append(f"{role}: cannot drain without the grid's Redis")
            return
        victims = [v["InstanceId"] for v in pick_surplus(staying, len(staying) - wanted)]
        try:
            self.drainer.start(self.grid, victims, f"fleet scaled to {wanted} {role}s")
        except Exception as exc:  # redis down: try again next round
            result.errors.append(f"{role}: cannot request a drain: {exc}")

    def _publish(self, result: Round) -> Round:
        result.pools = self.pools.to_dict(self.clock())
        if self.grid is not None:
            try:
                self.grid.set(status_key(self.fleet), json.dumps(result.to_dict()), ex=3600)
            except Exception as exc:
                log.debug("cannot publish the controller's status: %s", exc)
        return result

    def run(self, interval_s: float | None = None) -> None:
        """Rounds until :meth:`stop`; a failed round is logged and the next one tried."""
        interval = interval_s or _env_float("PYGIRDER_CONTROLLER_INTERVAL_S", DEFAULT_INTERVAL_S)
        while not self.stopped.is_set():
            try:
                self.step()
            except CloudError as exc:
                log.error("controller round failed: %s", exc)
            self.stopped.wait(interval)

    def stop(self) -> None:
        self.stopped.set()


# ---------------------------------------------------------------------- the role


def controller_policy(
    *,
    name: str,
    fleet: str,
    region: str,
    account_id: str,
    queue_arn: str,
    worker_role_arn: str,
) -> dict[str, Any]:
    """What the controller may do, and only for ``fleet``.

    Launch only from this fleet's launch templates, only instances tagged as this
    fleet's, into pygirder's own subnets and security group, from Amazon's or this
    account's images; pass only the workers' instance role, only to EC2; terminate
    only this fleet's instances; read and delete status messages of the status queue;
    read this fleet's parameters.  Describe calls only list.
    """
    p = partition(region)
    ec2 = f"arn:{p}:ec2:{region}:{account_id}"
    this_fleet = {f"aws:ResourceTag/{TAG_FLEET}": fleet}
    launch = ["ec2:CreateFleet", "ec2:RunInstances"]
    return {
        "Version": POLICY_VERSION,
        "Statement": [
            # What a launch makes (instances, volumes, interfaces, the EC2 Fleet) must be
            # tagged as this fleet's.
            {"Sid": "LaunchOnlyThisFleetsInstances", "Effect": "Allow", "Action": launch,
             "Resource": [f"{ec2}:*", f"arn:{p}:ec2:{region}::image/*"],
             "Condition": {"StringEquals": {f"aws:RequestTag/{TAG_FLEET}": fleet}}},
            # What a launch refers to (subnet, security group, key pair, launch template)
            # must be pygirder's, and if it belongs to a fleet, to this one: no other
            # fleet's launch template.
            {"Sid": "LaunchFromThisFleetsTemplates", "Effect": "Allow", "Action": launch,
             "Resource": "*",
             "Condition": {"StringEquals": {f"aws:ResourceTag/{TAG_MANAGED}": "true"},
                           "StringEqualsIfExists": this_fleet}},
            {"Sid": "LaunchOwnOrAmazonImages", "Effect": "Allow", "Action": launch,
             "Resource": "*",
             "Condition": {"StringEquals": {"ec2:Owner": ["amazon", account_id]}}},
            # ec2:CreateAction exists only while a create tags what it makes.
            {"Sid": "TagOnlyWhatALaunchMakes", "Effect": "Allow", "Action": "ec2:CreateTags",
             "Resource": f"{ec2}:*",
             "Condition": {"Null": {"ec2:CreateAction": "false"},
                           "StringEquals": {f"aws:RequestTag/{TAG_FLEET}": fleet}}},
            {"Sid": "TerminateOnlyThisFleet", "Effect": "Allow",
             "Action": "ec2:TerminateInstances", "Resource": f"{ec2}:instance/*",
             "Condition": {"StringEquals": this_fleet}},
            {"Sid": "SeeTheFleet", "Effect": "Allow",
             "Action": ["ec2:DescribeInstances", "ec2:DescribeLaunchTemplates"],
             "Resource": "*"},
            {"Sid": "PassOnlyTheWorkersRoleToEc2", "Effect": "Allow", "Action": "iam:PassRole",
             "Resource": worker_role_arn,
             "Condition": {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}},
            {"Sid": "ReadStatusMessages", "Effect": "Allow",
             "Action": ["sqs:ReceiveMessage", "sqs:DeleteMessage"], "Resource": queue_arn},
            {"Sid": "ReadThisFleetsTarget", "Effect": "Allow", "Action": "ssm:GetParameter",
             "Resource": f"arn:{p}:ssm:{region}:{account_id}:parameter/pygirder/{name}/{fleet}/*"},
        ],
    }  # fmt: skip


# ---------------------------------------------------------------------- the command

app = typer.Typer(
    name="pygirder-controller",
    help="The fleet controller (run by the agent on a fleet's redis node).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@service(app, stop="flag")
def run(
    ctx: ServiceContext,
    fleet: Annotated[str, typer.Option("--fleet", help="Id of the fleet to keep.")],
    name: Annotated[str, typer.Option("--name", help="Deployment name (tags, SSM path).")],
    region: Annotated[str, typer.Option("--region", help="The fleet's region.")],
    queue_url: Annotated[
        str | None, typer.Option("--queue-url", help="The status queue (announcements).")
    ] = None,
    redis_url: Annotated[
        str, typer.Option("--redis", help="redis://HOST:PORT/DB of the grid (no password).")
    ] = "redis://127.0.0.1:6379/0",
    interval: Annotated[
        float | None, typer.Option(help="Seconds between rounds (default 10).")
    ] = None,
) -> dict[str, int]:
    """Keep the fleet at its target until SIGTERM; the Redis password comes from SSM."""
    import redis

    from ..instance.announce import read_redis_password
    from ..instance.supervisor import with_password
    from .naming import check_fleet_id

    for noisy in ("botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    check_fleet_id(fleet)
    password = read_redis_password(name, fleet, region=region)
    grid = redis.Redis.from_url(
        with_password(redis_url, password), socket_timeout=10, socket_connect_timeout=5
    )
    config = CloudConfig(name=name, region=region)
    control = Controller(config, fleet, aws=Aws(config), queue_url=queue_url, grid=grid)

    def stop_when_asked() -> None:
        ctx.stopping.wait()
        control.stop()

    stopper = threading.Thread(target=stop_when_asked, name="stop-watch", daemon=True)
    stopper.start()
    try:
        control.run(interval)
    finally:
        grid.close()
    return {"rounds": control.rounds}


def main() -> None:
    app(prog_name="python -m pygirder.cloud.fleet.controller")


if __name__ == "__main__":
    main()
