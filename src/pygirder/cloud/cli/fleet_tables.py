"""The tables of the fleet commands: what ``up`` built, the running fleet, each role's
target against what runs, its cost, ``down``'s proof, ``sweep``'s orphans and a
rehearsal's timeline.

Each function turns one report of the fleet verbs into rich renderables; the
commands (:mod:`.fleet`) decide where they go.  Imported without boto3.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table


def money(value: float | None, digits: int = 4) -> str:
    return "?" if value is None else f"${value:,.{digits}f}"


def uptime(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def summary_dict(summary: Any) -> dict[str, Any]:
    """``up --json``: the fleet, its ready members with their spot prices, the removed."""
    return {
        "fleet": summary.fleet,
        "expires": summary.expires.isoformat(),
        "hourly_usd": summary.hourly_usd,
        "instances": [
            {
                **m.__dict__,
                "state": str(m.state),
                "spot_price": summary.prices.get(m.instance_id),
            }
            for m in summary.members
        ],
        "removed": [m.instance_id for m in summary.removed],
    }


def summary_table(summary: Any, name: str, region: str) -> Table:
    """What ``up`` built: one row per ready instance."""
    table = Table(title=f"fleet {summary.fleet} ({name!r} in {region})", title_justify="left")
    for column in ("Role", "Instance", "Type", "Zone", "Private", "Public", "$/hour"):
        table.add_column(column, no_wrap=True, justify="right" if column == "$/hour" else "left")
    for m in summary.members:
        price = summary.prices.get(m.instance_id)
        table.add_row(
            m.role,
            m.instance_id,
            m.instance_type,
            m.zone,
            m.private_ip,
            m.public_ip or "-",
            money(price),
        )
    table.caption = (
        f"{len(summary.members)} instances, {money(summary.hourly_usd)} per hour at current "
        f"spot prices; they shut themselves down at {summary.expires:%Y-%m-%d %H:%M} UTC"
    )
    return table


def status_table(status: Any) -> Table:
    """The running fleet: role, instance, state, address, uptime, price, cost so far."""
    table = Table(title=f"fleet {status.fleet}", title_justify="left", show_footer=True)
    table.add_column("Role", footer="Total")
    table.add_column("Instance", no_wrap=True)
    table.add_column("State")
    table.add_column("Address", no_wrap=True)
    table.add_column("Uptime", justify="right")
    table.add_column("Spot $/h", justify="right", footer=money(status.hourly_usd))
    table.add_column("Cost so far", justify="right", footer=money(status.cost_usd))
    for r in status.rows:
        address = r.address + (f"\n[dim]{r.public_ip}[/]" if r.public_ip else "")
        table.add_row(
            r.role,
            f"{r.instance_id}\n[dim]{r.instance_type} {r.zone}[/]",
            r.state,
            address,
            uptime(r.uptime_s),
            money(r.spot_price),
            money(r.cost_usd),
        )
    expires = status.expires
    table.caption = f"expires {expires:%Y-%m-%d %H:%M} UTC" if expires else None
    return table


def sizes_table(fleet: str, sizes: list[Any]) -> Table:
    """Each role's target against its live and draining instances; a lost redis node in red."""
    table = Table(title=f"fleet {fleet}: target and actual", title_justify="left")
    for column in ("Role", "Target", "Live", "Draining"):
        table.add_column(column, justify="left" if column == "Role" else "right")
    for size in sizes:
        target = "-" if size.target is None else str(size.target)
        live = str(size.live)
        if size.role == "redis" and size.live == 0:
            live = "[red]0: lost[/]"
        table.add_row(size.role, target, live, str(size.draining))
    return table


def cost_table(found: dict[str, Any]) -> Table:
    """What the fleet costs: per role per hour, so far, and until it expires."""
    table = Table(title=f"cost of fleet {found['fleet']}", title_justify="left")
    for column in ("Role", "Instances", "$/hour", "So far", "Until expiry"):
        table.add_column(column, justify="left" if column == "Role" else "right")
    for role, entry in found["roles"].items():
        table.add_row(
            role,
            str(entry["instances"]),
            money(entry["hourly_usd"]),
            money(entry["cost_usd"]),
            money(entry["to_expiry_usd"]),
        )
    if found["nat"]:
        nat = found["nat"]
        table.add_row(f"NAT ({nat['state']})", "1", money(nat["hourly_usd"]), "", "")
    table.caption = (
        f"{money(found['hourly_usd'])} per hour in all; spot prices change, EC2 bills per "
        "second; data transfer and requests are extra"
    )
    return table


def leftovers_table(fleet: str, left: dict[str, list[str]]) -> Table:
    """``down``'s proof: what of the fleet AWS still lists, kind by kind."""
    from ..leftovers import FLEET_KINDS

    table = Table(
        title=f"fleet {fleet}: what is left (asked again after down)", title_justify="left"
    )
    table.add_column("Kind")
    table.add_column("Left", justify="right")
    table.add_column("Ids", overflow="fold")
    for kind in FLEET_KINDS:
        ids = left.get(kind.key, [])
        mark = "[green]0[/]" if not ids else f"[bold red]{len(ids)}[/]"
        table.add_row(kind.summary, mark, escape(", ".join(ids)))
    return table


def orphans_table(report: Any, region: str) -> Table:
    """``sweep``'s finds: kind, id, setup, fleet, age and why each is an orphan."""
    table = Table(
        title=f"orphans in {region}" + (" (dry run)" if report.dry_run else ""),
        title_justify="left",
    )
    for column in ("Kind", "Id", "Setup", "Fleet", "Age", "Why"):
        table.add_column(column, overflow="fold")
    for o in report.orphans:
        table.add_row(
            o.kind, o.id, o.name, o.fleet, uptime(o.age_s) if o.age_s < 1e9 else "?", o.reason
        )
    return table


def rehearsal_tables(report: Any, workers: int, started: datetime) -> list[Table]:
    """A rehearsal's timeline and, when measured, the peak memory per role."""
    table = Table(
        title=f"rehearsal with {workers} workers, {started:%Y-%m-%d %H:%M} UTC",
        title_justify="left",
    )
    table.add_column("At", justify="right", no_wrap=True)
    table.add_column("Step", no_wrap=True)
    table.add_column("Took", justify="right", no_wrap=True)
    table.add_column("What happened", overflow="fold")
    for s in report.steps:
        mark = "" if s.ok else "[bold red]✗ [/]"
        table.add_row(f"{s.start_s:.1f}s", mark + s.name, f"{s.seconds:.1f}s", escape(s.detail))
    table.caption = f"{report.seconds:.1f}s in all"
    if not report.peak_rss:
        return [table]
    mem = Table(
        title="peak memory per simulated instance (RSS of its process tree)",
        title_justify="left",
    )
    for column in ("Role", "Instances", "Peak (max)", "Peak (mean)"):
        mem.add_column(column, justify="left" if column == "Role" else "right")
    for role, values in sorted(report.peak_rss.items()):
        mem.add_row(
            role,
            str(len(values)),
            f"{max(values) / 2**20:.0f} MiB",
            f"{sum(values) / len(values) / 2**20:.0f} MiB",
        )
    return [table, mem]


def mem_available() -> int | None:
    """Bytes of memory this machine has available (Linux), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None
