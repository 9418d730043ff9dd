"""Spot capacity for one role: EC2 Fleet requests for the shortfall, learning from refusals.

Each request is an ``instant`` EC2 Fleet from the role's launch template,
diversified over every (instance type, subnet) pool that has not just failed
(capacity-optimized).  Capacity errors and partial fulfilment are normal on spot: a
pool out of capacity cools down for :data:`POOL_COOLDOWN_S`, a pool that cannot work
at all (type not offered, price cap too low) is dropped for good, a quota stops the
role, and the shortfall is asked for again with capped exponential backoff.  The
redis node is asked for on-demand unless the config says ``redis_market = "spot"``.

The fleet controller (:mod:`.controller`) launches with the same request
(:func:`instant_fleet`) and keeps its pool back-off across rounds in a
:class:`PoolBook`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..aws import CAPACITY_CODES, POOL_UNUSABLE_CODES, Aws, is_quota_code
from ..config import CloudConfig
from ..errors import CloudError, FleetError
from ..instance.common import Role
from ..tags import as_tag_list
from .members import Member, RoleLaunch, fill
from .naming import fleet_tags

# CreateFleet errors are sorted by ``aws.CAPACITY_CODES``, ``aws.POOL_UNUSABLE_CODES``
# and ``aws.is_quota_code``; a pool out of capacity is tried again after this long.
POOL_COOLDOWN_S = 60.0
# First back-off of a pool after a capacity error, doubled per failure, capped.
DEFAULT_POOL_BACKOFF_S = 60.0
POOL_BACKOFF_CAP_S = 30 * 60.0


def profile_not_visible(code: str, message: str) -> bool:
    """EC2 refused an instance profile IAM just made: it sees IAM's changes seconds
    later, so the launch is asked again (with the shortfall's backoff, within the
    deadline) instead of failing ``up``."""
    return code.startswith("InvalidParameter") and "instance profile" in message.lower()


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


Pool = tuple[str, str]  # (instance type, subnet id)


@dataclass
class PoolState:
    failures: int = 0
    blocked_until: float = 0.0
    last_error: str = ""


class PoolBook:
    """Per-pool back-off after capacity errors, kept across rounds of the fleet controller:
    a pool's wait doubles with each failure up to ``cap_s`` (Karpenter's
    unavailable-offerings cache, per pool rather than forgotten all at once, so
    launches do not ping-pong between two empty pools)."""

    def __init__(
        self, base_s: float = DEFAULT_POOL_BACKOFF_S, cap_s: float = POOL_BACKOFF_CAP_S
    ) -> None:
        self.base_s = base_s
        self.cap_s = max(cap_s, self.base_s)
        self.pools: dict[Pool, PoolState] = {}

    def usable(self, pools: Sequence[Pool], now: float) -> list[Pool]:
        return [p for p in pools if self.pools.get(p, PoolState()).blocked_until <= now]

    def failed(self, pool: Pool, code: str, message: str, now: float) -> float:
        """Record a failure; returns how long the pool is left alone."""
        state = self.pools.setdefault(pool, PoolState())
        state.failures += 1
        state.last_error = f"{code}: {message}"[:300]
        if code in POOL_UNUSABLE_CODES:
            state.blocked_until = math.inf
            return math.inf
        wait = min(self.cap_s, self.base_s * 2 ** min(state.failures - 1, 20))
        wait *= random.uniform(0.8, 1.0)
        state.blocked_until = now + wait
        return wait

    def succeeded(self, pool: Pool) -> None:
        self.pools.pop(pool, None)

    def to_dict(self, now: float) -> dict[str, Any]:
        return {
            f"{t}/{s}": {
                "failures": st.failures,
                "blocked_s": None if math.isinf(st.blocked_until)
                else round(max(0.0, st.blocked_until - now), 1),
                "last_error": st.last_error,
            }
            for (t, s), st in self.pools.items()
        }  # fmt: skip


@dataclass
class Capacity:
    """Asks EC2 for the spot instances of a fleet's launches (see the module docstring)."""

    aws: Aws
    config: CloudConfig
    fleet: str
    expires: datetime
    instance_types: tuple[str, ...]
    max_price: float | None
    backoff_s: tuple[float, float]
    say: Callable[[str], None]
    clock: Callable[[], float]

    def tags(self, launch: RoleLaunch) -> list[dict[str, str]]:
        return as_tag_list(fleet_tags(self.config, self.fleet, self.expires, str(launch.role)))

    def pools(self, launch: RoleLaunch) -> list[tuple[str, str]]:
        now = self.clock()
        types = launch.instance_types or self.instance_types
        every = [(t, s) for t in types for s in launch.subnet_ids]
        usable = [p for p in every if launch.blocked.get(p, 0.0) <= now]
        if not usable:
            # Every pool failed recently: forget the cool-downs, keep the permanent bans.
            launch.blocked = {p: u for p, u in launch.blocked.items() if math.isinf(u)}
            usable = [p for p in every if p not in launch.blocked]
        return usable

    def request(self, launch: RoleLaunch) -> None:
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
        try:
            # The client token is unique per attempt; Aws.call's retries of one attempt
            # reuse it, so a retried request never launches twice.
            got = instant_fleet(
                self.aws, token=f"{launch.token or launch.launch_id}-{launch.attempts}",
                template_id=launch.template_id, pools=pools, count=wanted,
                tags=self.tags(launch), market="on-demand" if on_demand else "spot",
                max_price=self.max_price,
            )  # fmt: skip
        except CloudError as exc:
            if exc.code in CAPACITY_CODES or profile_not_visible(exc.code, str(exc)):
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
            fill(self.aws, launch, new)
        if launch.shortfall and not launch.stopped:
            first, cap = self.backoff_s
            delay = min(cap, first * 2 ** (launch.attempts - 1)) * random.uniform(0.5, 1.0)
            launch.next_at = self.clock() + delay
            self.say(
                f"{launch.role}: {launch.shortfall} short; asking again in {delay:.1f}s "
                f"from other pools"
            )

    def _errors(self, launch: RoleLaunch, errors: list[dict], pools: list[tuple[str, str]]) -> None:
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
            elif profile_not_visible(code, message):
                self.say(f"{launch.role}: EC2 does not see the instance profile yet: {text}")
            else:
                fatal.append(text)
        if fatal:
            raise FleetError(
                f"EC2 refused to launch {launch.role} instances: {'; '.join(fatal)}",
                code="CreateFleetError",
            )
