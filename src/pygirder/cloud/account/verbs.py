"""The account verbs: plan, setup, status, teardown and the proof that nothing is left.

:func:`account_kinds` lists every kind once, in dependency order; the verbs walk
that list and return a :class:`Report` that the command line renders.
"""

from __future__ import annotations

import re
from typing import Any

from ..aws import Aws
from ..config import CloudConfig, CloudConfigError
from ..errors import CloudError, CredentialsError, FleetAliveError, ResourceConflictError
from ..leftovers import INSTANCES, KINDS, Scope
from ..tags import (
    TAG_MANAGED,
    TAG_NAME,
)
from .billing import BillingAlarm, BillingEmail, Budget, OldBillingAlarms
from .iam import InstanceProfile, InstanceRole, PermissionsBoundary
from .keys import ClusterKey, UserKey, ensure_key_pair, read_public_key
from .kind import BILLING_REGION, Ctx, Kind, LeftoverKind, Progress
from .messaging import BillingTopic, StatusQueue, StatusSubscription, StatusTopic
from .model import Action, Drift, Found, Item, Report
from .nat import NatAddress, NatGateway, NatInstance, S3Endpoint
from .network import InternetGateway, RouteTable, SecurityGroup, Subnet, Vpc
from .s3 import Bucket

# ------------------------------------------------------------------ the lists


def account_kinds(config: CloudConfig) -> list[Kind]:
    """Every account-level kind, in creation order (teardown walks it backwards).

    Kinds the config does not want (the other NAT flavour, old alarms) stay in the
    list: setup deletes them if they exist, teardown deletes everything.
    """
    return [
        PermissionsBoundary(),
        InstanceRole(),
        InstanceProfile(),
        Bucket(),
        StatusTopic(),
        StatusQueue(),
        StatusSubscription(),
        UserKey(),
        ClusterKey(),
        Vpc(),
        InternetGateway(),
        Subnet(public=True),
        Subnet(public=False),
        RouteTable(public=True),
        SecurityGroup(nat=False),
        SecurityGroup(nat=True),
        NatInstance(),
        NatAddress(),
        NatGateway(),
        RouteTable(public=False),
        S3Endpoint(),
        BillingTopic(),
        BillingEmail(),
        *[BillingAlarm(t) for t in config.alarm_thresholds_usd],
        OldBillingAlarms(),
        Budget(),
    ]


def leftover_kinds() -> list[Kind]:
    """What fleet and image commands create, in the order teardown removes it."""
    return [LeftoverKind(kind) for kind in KINDS]


# ------------------------------------------------------------------ commands


def context(config: CloudConfig, aws: Aws | None, progress: Progress | None) -> Ctx:
    return Ctx(config, aws or Aws(config), progress)


def _preflight(ctx: Ctx, *, for_setup: bool) -> list[str]:
    """Check what can be checked before touching anything; return warnings."""
    config = ctx.config
    warnings = list(config.warnings)
    if for_setup:
        config.require_ssh_source()
        created = ensure_key_pair(config)
        if created is not None:
            warnings.append(
                f"created an SSH key pair for pygirder: {created} (private, mode 0600) and "
                f"{config.public_key_path}, because {config.public_key_file} does not "
                "exist; set [cloud] public_key_file to use your own key instead"
            )
        ctx.public_key = read_public_key(config)
    else:
        if not config.ssh_from:
            warnings.append(
                "[cloud] ssh_from is not set: setup will refuse until it is "
                '(e.g. ssh_from = "203.0.113.7/32").'
            )
        try:
            ctx.public_key = read_public_key(config)
        except CloudConfigError as exc:
            warnings.append(str(exc))
    ctx.aws.account_id  # noqa: B018 - fail early and clearly on credentials
    zones = ctx.ec2("describe_availability_zones").get("AvailabilityZones", [])
    names = sorted(z["ZoneName"] for z in zones if z.get("State", "available") == "available")
    if config.zone not in names:
        raise CloudConfigError(
            f"[cloud] zone {config.zone!r} is not available in region {config.region} for "
            f"this account; available zones: {', '.join(names) or 'none'}",
            problems=[("zone", config.zone, f"one of {', '.join(names)}")],
        )
    if config.alert_email is None:
        warnings.append(
            "[cloud] alert_email is not set: billing alarms and budget alerts go to the "
            "billing topic with nobody subscribed."
        )
    return warnings


def _discover(ctx: Ctx, kinds: list[Kind]) -> list[tuple[Kind, Item, list[Found], list[Drift]]]:
    """Find every kind and decide what setup would do with it."""
    rows = []
    for kind in kinds:
        found = kind.find(ctx)
        ctx.found[kind.key] = found
        wanted = kind.wanted(ctx.config)
        clash = ctx.clashes.get(kind.key)
        drift: list[Drift] = []
        if not wanted:
            for f in found:
                item = _item(ctx, kind, f, Action.DELETE, "no longer wanted by the config")
                rows.append((kind, item, [f], drift))
            continue
        if clash:
            item = Item(kind.key, kind.title, kind.label(ctx), Action.CONFLICT, detail=clash)
        elif len(found) > 1:
            ids = ", ".join(f.id for f in found)
            item = _item(
                ctx,
                kind,
                found[0],
                Action.CONFLICT,
                f"{len(found)} found ({ids}): this is likely a resource leak; run "
                "`pygirder cloud teardown` and set up again",
            )
        elif found:
            drift = kind.check(ctx, found[0])
            action = max((d.action for d in drift), key=_SEVERITY.__getitem__, default=Action.NONE)
            item = _item(ctx, kind, found[0], action, "; ".join(d.text for d in drift))
        else:
            item = Item(kind.key, kind.title, kind.label(ctx), Action.CREATE, state="missing")
        rows.append((kind, item, found, drift))
    return rows


_SEVERITY = {Action.NONE: 0, Action.UPDATE: 1, Action.REPLACE: 2, Action.CONFLICT: 3}


def _item(ctx: Ctx, kind: Kind, found: Found, action: Action, detail: str = "") -> Item:
    return Item(
        kind.key,
        kind.title,
        found.name or kind.label(ctx),
        action,
        id=found.id,
        state=found.state,
        detail=detail,
    )


def plan(
    config: CloudConfig, *, aws: Aws | None = None, progress: Progress | None = None
) -> Report:
    """What :func:`setup` would create, change or delete.  Changes nothing."""
    ctx = context(config, aws, progress)
    report = Report("plan", warnings=_preflight(ctx, for_setup=False))
    report.items = [item for _, item, _, _ in _discover(ctx, account_kinds(config))]
    return report


def setup(
    config: CloudConfig, *, aws: Aws | None = None, progress: Progress | None = None
) -> Report:
    """Create what is missing, fix what drifted; a no-op when all is as configured.

    Raises :class:`ResourceConflictError` before changing anything if a name is held
    by something pygirder did not create (or a resource is duplicated).
    """
    ctx = context(config, aws, progress)
    report = Report("setup", warnings=_preflight(ctx, for_setup=True))
    rows = _discover(ctx, account_kinds(config))
    conflicts = [item for _, item, _, _ in rows if item.action is Action.CONFLICT]
    if conflicts:
        lines = "\n".join(f"  - {i.title} {i.name}: {i.detail}" for i in conflicts)
        raise ResourceConflictError(
            f"setup stopped before changing anything:\n{lines}", items=conflicts
        )
    deletions = []
    for kind, item, found, drift in rows:
        if item.action is Action.DELETE:
            deletions.append((kind, item, found[0]))
            continue
        if item.action is Action.NONE:
            report.items.append(item)
            continue
        ctx.say(f"{_VERB[item.action]} {kind.title} {item.name}")
        if item.action is Action.CREATE:
            result = kind.create(ctx)
        elif item.action is Action.REPLACE:
            kind.delete(ctx, found[0])
            result = kind.create(ctx)
        else:
            result = kind.update(ctx, found[0], drift)
        ctx.found[kind.key] = [result]
        item.id, item.state = result.id, result.state
        item.name = result.name or item.name
        item.detail = "; ".join(filter(None, [item.detail, kind.describe(ctx, result)]))
        report.items.append(item)
    for kind, item, found in reversed(deletions):
        ctx.say(f"deleting {kind.title} {item.name} ({found.id}): {item.detail}")
        kind.delete(ctx, found)
        ctx.found[kind.key] = []
        report.items.append(item)
    return report


_VERB = {Action.CREATE: "creating", Action.UPDATE: "updating", Action.REPLACE: "replacing"}


def status(
    config: CloudConfig, *, aws: Aws | None = None, progress: Progress | None = None
) -> Report:
    """Every resource, its state, and the monthly cost of what is left running."""
    ctx = context(config, aws, progress)
    report = Report("status", warnings=list(config.warnings))
    for kind in [*account_kinds(config), *leftover_kinds()]:
        found = kind.find(ctx)
        ctx.found[kind.key] = found
        clash = ctx.clashes.get(kind.key)
        if clash:
            report.items.append(
                Item(kind.key, kind.title, kind.label(ctx), state="not ours", detail=clash)
            )
            continue
        if not found and kind.wanted(config):
            report.items.append(
                Item(kind.key, kind.title, kind.label(ctx), state="missing", monthly_usd=0.0)
            )
        for f in found:
            item = _item(ctx, kind, f, Action.NONE)
            item.action = None
            item.monthly_usd = kind.monthly_usd(ctx, f)
            item.detail = kind.describe(ctx, f)
            if not kind.wanted(config):
                item.detail = (item.detail + "; " if item.detail else "") + (
                    "left over: teardown removes it"
                )
            report.items.append(item)
    return report


def fleet_instances(config: CloudConfig, *, aws: Aws | None = None) -> list[dict[str, Any]]:
    """Live instances of this setup's fleets (tagged ``pygirder:fleet``)."""
    ctx = context(config, aws, None)
    return _fleet_instances(ctx)


def _fleet_instances(ctx: Ctx) -> list[dict[str, Any]]:
    return [item.data for item in INSTANCES.find(ctx.aws, Scope(ctx.name))]


def teardown(
    config: CloudConfig,
    *,
    aws: Aws | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> Report:
    """Delete everything tagged for this setup, in dependency order, then prove it.

    Refuses (:class:`FleetAliveError`) while fleet instances are alive, unless
    ``force``: then they are terminated first.  Failures do not stop the rest; they
    are reported as ``failed`` items, and ``remaining`` lists what is still tagged.
    """
    ctx = context(config, aws, progress)
    report = Report("teardown", warnings=list(config.warnings))
    alive = _fleet_instances(ctx)
    if alive and not force:
        ids = [i["InstanceId"] for i in alive]
        raise FleetAliveError(
            f"{len(ids)} fleet instance(s) of {config.name!r} are still alive "
            f"({', '.join(ids[:10])}{', ...' if len(ids) > 10 else ''}): stop the fleet "
            "first (`pygirder cloud down`), or pass --force to terminate them too.",
            instance_ids=ids,
        )
    kinds = leftover_kinds() + [k for k in reversed(account_kinds(config)) if not k.shared]
    # Discover in creation order (the subscription needs the topic), delete backwards.
    for kind in reversed(kinds):
        ctx.found[kind.key] = kind.find(ctx)
    for kind in kinds:
        for found in ctx.found.get(kind.key, []):
            item = _item(ctx, kind, found, Action.DELETE)
            ctx.say(f"deleting {kind.title} {item.name} ({found.id})")
            try:
                kind.delete(ctx, found)
                item.state = "deleted"
            except CredentialsError:
                raise  # every later call would fail the same way
            except CloudError as exc:
                ctx.failed = True
                item.action, item.state, item.detail = Action.FAILED, "failed", str(exc)
                ctx.say(f"  failed: {exc}")
            report.items.append(item)
    report.remaining = verify_clean(config, aws=ctx.aws)
    return report


def verify_clean(config: CloudConfig, *, aws: Aws | None = None) -> list[str]:
    """Everything still tagged ``pygirder:name=<name>``: every kind is asked again,
    and the Resource Groups Tagging API is asked for anything else so tagged."""
    ctx = context(config, aws, None)
    left: list[str] = []
    known: set[str] = set()
    for kind in account_kinds(config) + leftover_kinds():
        if kind.shared:
            continue
        for found in kind.find(ctx):
            ctx.found.setdefault(kind.key, []).append(found)
            left.append(f"{kind.title} {found.name} ({found.id}, {found.state})")
            known.update({found.id, found.arn})
    regions = sorted({config.region, BILLING_REGION})
    for region in regions:
        for page in ctx.aws.pages(
            "resourcegroupstaggingapi",
            "get_resources",
            token="PaginationToken",
            region=region,
            TagFilters=[
                {"Key": TAG_MANAGED, "Values": ["true"]},
                {"Key": TAG_NAME, "Values": [config.name]},
            ],
        ):
            for mapping in page.get("ResourceTagMappingList", []):
                arn = mapping["ResourceARN"]
                resource_id = re.split(r"[/:]", arn)[-1]
                if arn in known or resource_id in known or _gone(ctx, arn, region):
                    continue
                left.append(f"tagged resource {arn}")
    return left


def _gone(ctx: Ctx, arn: str, region: str) -> bool:
    """The tagging API lists some resources for a while after deletion."""
    match = re.match(r"arn:[^:]+:ec2:[^:]*:[^:]*:(instance|natgateway|vpc-endpoint)/(.+)$", arn)
    if not match:
        return False
    kind, rid = match.groups()
    if kind == "instance":
        got = ctx.call(
            "ec2",
            "describe_instances",
            region=region,
            InstanceIds=[rid],
            ignore=("InvalidInstanceID.NotFound",),
        )
        states = [
            i["State"]["Name"] for r in (got or {}).get("Reservations", []) for i in r["Instances"]
        ]
        return all(s == "terminated" for s in states)
    if kind == "natgateway":
        got = ctx.call(
            "ec2",
            "describe_nat_gateways",
            region=region,
            NatGatewayIds=[rid],
            ignore=("NatGatewayNotFound", "InvalidNatGatewayID.NotFound"),
        )
        return all(g["State"] in ("deleted", "failed") for g in (got or {}).get("NatGateways", []))
    got = ctx.call(
        "ec2",
        "describe_vpc_endpoints",
        region=region,
        VpcEndpointIds=[rid],
        ignore=("InvalidVpcEndpointId.NotFound",),
    )
    return all(
        e["State"].lower() in ("deleted", "deleting") for e in (got or {}).get("VpcEndpoints", [])
    )
