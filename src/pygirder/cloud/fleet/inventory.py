"""What runs and what it costs: the live fleets, instance rows, fleet status and cost,
spot prices, and the rows the dashboard shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..aws import LIVE_INSTANCE_STATES, Aws
from ..config import CloudConfig
from ..errors import NoFleetError
from ..leftovers import BY_KEY, Scope
from ..tags import (
    TAG_EXPIRES,
    TAG_FLEET,
    TAG_ROLE,
    as_utc,
    ec2_filters,
    from_tag_list,
    parse_time,
    utcnow,
)
from .naming import check_fleet_id, describe_instances, instances_of


def live_fleets(config: CloudConfig, *, aws: Aws | None = None) -> dict[str, list[dict]]:
    """Fleet id -> its live instances, for every fleet of this setup that has any
    instance, EC2 fleet or launch template left."""
    aws = aws or Aws(config)
    found: dict[str, list[dict]] = {}
    for inst in instances_of(aws, config.name):
        fleet = from_tag_list(inst.get("Tags")).get(TAG_FLEET, "")
        found.setdefault(fleet, []).append(inst)
    for key in ("ec2-fleets", "launch-templates"):
        for item in BY_KEY[key].find(aws, Scope(config.name)):
            found.setdefault(item.fleet, [])
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
        StartTime=utcnow(),
        ignore=("UnsupportedOperation",),
    )
    latest: dict[tuple[str, str], tuple[datetime, float]] = {}
    for item in (got or {}).get("SpotPriceHistory", []):
        key = (item.get("InstanceType", ""), item.get("AvailabilityZone", ""))
        if key not in out:
            continue
        when = as_utc(item.get("Timestamp")) or datetime.min.replace(tzinfo=UTC)
        try:
            price = float(item["SpotPrice"])
        except (KeyError, ValueError):
            continue
        if key not in latest or when > latest[key][0]:
            latest[key] = (when, price)
    for key, (_, price) in latest.items():
        out[key] = price
    return out


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
        return (utcnow() - self.launched).total_seconds() if self.launched else 0.0

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
        launched=as_utc(inst.get("LaunchTime")),
        expires=parse_time(tags.get(TAG_EXPIRES)),
        lifecycle=inst.get("InstanceLifecycle", "on-demand"),
    )


def rows_of(
    aws: Aws, name: str | None, fleet: str | None, *, prices: bool = True
) -> list[InstanceRow]:
    rows = [_row(i) for i in instances_of(aws, name, fleet)]
    if prices and rows:
        found = spot_prices(aws, {(r.instance_type, r.zone) for r in rows})
        from ..pricing import PRICE_INSTANCE_HOUR

        for row in rows:
            if row.state in ("running", "pending") and row.lifecycle != "spot":
                # On-demand (the redis node by default): the list price, when known.
                row.spot_price = PRICE_INSTANCE_HOUR.get(row.instance_type)
            elif row.state in ("running", "pending"):
                row.spot_price = found.get((row.instance_type, row.zone))
            else:
                row.spot_price = 0.0  # stopped or shutting down: no compute charge
    rows.sort(
        key=lambda r: (r.fleet, _ROLE_ORDER.get(r.role, 9), r.launched or utcnow(), r.instance_id)
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
    from ..pricing import PRICE_INSTANCE_HOUR

    aws = aws or Aws(config)
    status = fleet_status(config, fleet, aws=aws)
    roles: dict[str, dict[str, Any]] = {}
    now = utcnow()
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
    found = describe_instances(
        aws,
        [*ec2_filters(config.name, "nat-instance"),
         {"Name": "instance-state-name", "Values": list(LIVE_INSTANCE_STATES)}],
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
    from ..config import load_config
    from ..errors import CloudConfigError

    try:
        config = load_config()
        import boto3  # noqa: F401 - only to know whether the cloud extra is installed
    except (CloudConfigError, ImportError):
        return None
    rows = rows_of(Aws(config), config.name, None, prices=False)
    return [r.to_dict() for r in rows]
