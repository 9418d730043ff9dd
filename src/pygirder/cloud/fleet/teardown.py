"""``down`` and ``sweep``: remove a fleet (or orphans) by tag, then prove it is gone.

``down`` and ``sweep`` remove by tag and then ask AWS again, with independent queries,
what of the fleet is left (:func:`fleet_leftovers`): that answer, not the absence of
errors, is the proof that nothing billable remains.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..aws import LIVE_INSTANCE_STATES, Aws
from ..config import CloudConfig
from ..errors import CloudError, CloudTimeoutError, NoFleetError
from ..leftovers import BY_KEY, FLEET_KINDS, Scope, find, wait_terminated
from ..tags import TAG_FLEET, from_tag_list, stamp, utcnow
from .inventory import live_fleets
from .naming import check_fleet_id, instances_of

# down removes these first and waits for the instances, then the rest of FLEET_KINDS.
_RUNNING = ("ec2-fleets", "instances", "spot-requests")


def fleet_leftovers(
    config: CloudConfig, fleet: str, *, aws: Aws | None = None
) -> dict[str, list[str]]:
    """What of a fleet could still cost money or clutter the account, asked afresh:
    kind -> ids (every list empty means the fleet is gone)."""
    aws = aws or Aws(config)
    found = find(aws, Scope(config.name, fleet))
    return {key: [item.id for item in items] for key, items in found.items()}


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
        for param in BY_KEY["ssm-parameters"].find(aws, Scope(config.name)):
            if param.fleet not in fleets:
                fleets.append(param.fleet)
        if len(fleets) > 1 and not all_fleets:
            raise NoFleetError(
                f"{len(fleets)} fleets of {config.name!r} are up ({', '.join(fleets)}): "
                "choose one with --fleet, or bring them all down with --all",
                code="AmbiguousFleet",
            )
    report = DownReport(fleets=fleets)
    for fl in fleets:
        scope = Scope(config.name, fl)
        ids = {key: [item.id for item in BY_KEY[key].find(aws, scope)] for key in _RUNNING}
        # Spot requests of our instances, tagged or not (EC2 does not always copy tags).
        requests = {
            i.get("SpotInstanceRequestId")
            for i in instances_of(aws, config.name, fl, [*LIVE_INSTANCE_STATES, "terminated"])
        }
        ids["spot-requests"] = sorted(set(ids["spot-requests"]) | {r for r in requests if r})
        for key in _RUNNING:
            kind = BY_KEY[key]
            if ids[key]:
                say(f"{fl}: removing {len(ids[key])} {kind.summary.split(' (')[0]}")
            try:
                kind.delete(aws, ids[key])
                report.removed.setdefault(key, []).extend(ids[key])
            except CloudError as exc:
                report.failures.append(f"{fl} {key}: {exc}")
        terminated = [
            i["InstanceId"]
            for i in instances_of(aws, config.name, fl, [*LIVE_INSTANCE_STATES, "terminated"])
        ]
        try:
            wait_terminated(aws, terminated, wait_timeout, wait_interval)
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
            from ..account import stop_nat

            try:
                nat = stop_nat(config, aws=aws)
                report.nat = f"stopped ({nat})" if nat else "none"
            except CloudError as exc:
                report.failures.append(f"NAT instance: {exc}")
    for fl in fleets:
        for kind in FLEET_KINDS:
            if kind.key in _RUNNING:
                continue
            found = [item.id for item in kind.find(aws, Scope(config.name, fl))]
            if found:
                say(f"{fl}: deleting {len(found)} {kind.summary}")
            try:
                kind.delete(aws, found)
                report.removed.setdefault(kind.key, []).extend(found)
            except CloudError as exc:
                report.failures.append(f"{fl} {kind.key}: {exc}")
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
    now = utcnow()
    found = find(aws, Scope(None))
    alive = {
        (item.setup, item.fleet) for item in found["instances"]
        if not (item.expires and item.expires < now)
    }  # fmt: skip
    out = []
    for kind, items in found.items():
        for item in items:
            age = (now - item.created).total_seconds() if item.created else math.inf
            expires = item.expires
            expired = expires is not None and expires < now
            if kind == "instances":
                if expires is not None and expired:
                    reason = f"its time-to-live ran out at {stamp(expires)}"
                elif expires is None and age > older_than_s:
                    reason = "no expiry tag and older than the limit"
                else:
                    continue
            elif (item.setup, item.fleet) in alive:
                continue
            elif expired or age > older_than_s:
                reason = "its fleet has no live instance"
            else:
                continue
            out.append(Orphan(kind, item.id, item.setup, item.fleet, age, reason))
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
    for kind in FLEET_KINDS:
        ids = [o.id for o in orphans if o.kind == kind.key]
        if not ids:
            continue
        say(f"removing {len(ids)} orphaned {kind.summary}")
        try:
            kind.delete(aws, ids)
            if kind is BY_KEY["instances"]:
                wait_terminated(aws, ids, interval=wait_interval)
            report.deleted += ids
        except CloudError as exc:
            report.failures.append(f"{kind.key}: {exc}")
    return report
