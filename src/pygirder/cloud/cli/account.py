"""``pygirder cloud init | plan | setup | status | teardown | policy``, and the groups
``artifact``, ``image`` and ``simulate``.

A Typer app (``app``) that the main CLI mounts as ``pygirder cloud``.  It imports
without boto3: AWS code is imported inside the commands.  Tables go to stdout,
progress and errors to stderr; ``--json`` gives machine-readable output.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ...errors import ConfigError, PygirderError
from ..config import (
    CONFIG_ENV,
    CloudConfig,
    CloudConfigError,
    config_from_dict,
    config_path,
    default_config_text,
    load_config,
)
from . import artifact as artifact_cli
from . import fleet as fleet_cli
from . import image as image_cli
from . import simulate as simulate_cli

if TYPE_CHECKING:
    from ..account import Report

app = typer.Typer(
    name="cloud",
    help="Set up, inspect and tear down the AWS account resources pygirder uses.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(artifact_cli.app, name="artifact")
app.add_typer(image_cli.app, name="image")
app.add_typer(simulate_cli.app, name="simulate")

out = Console(highlight=False, soft_wrap=False)
err = Console(stderr=True, highlight=False)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help=f"pygirder.toml to use (default: ${CONFIG_ENV}, else ./pygirder.toml).",
        dir_okay=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

_ACTION_STYLE = {
    "create": "green",
    "update": "yellow",
    "replace": "magenta",
    "delete": "red",
    "conflict": "bold red",
    "failed": "bold red",
    "ok": "dim",
}
_STATE_STYLE = {
    "missing": "yellow",
    "not ours": "bold red",
    "failed": "bold red",
    "deleted": "dim",
    "running": "green",
    "available": "green",
    "stopped": "cyan",
}


def _fail(exc: PygirderError) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(str(exc))}")
    return typer.Exit(2 if isinstance(exc, ConfigError) else 1)


def _progress(text: str) -> None:
    err.print(f"[dim]{escape(text)}[/]")


# ------------------------------------------------------------------- commands


@app.command()
def init(
    config: ConfigOption = None,
    ssh_from: Annotated[
        str | None,
        typer.Option(
            "--ssh-from", help='CIDR allowed to SSH in, e.g. "203.0.113.7/32" (your address).'
        ),
    ] = None,
    name: Annotated[str, typer.Option(help="Setup name (prefix of every resource).")] = "default",
    region: Annotated[str, typer.Option(help="AWS region.")] = "us-east-1",
    zone: Annotated[str, typer.Option(help="Availability zone (default: <region>a).")] = "",
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing cloud table.")
    ] = False,
) -> None:
    """Write a commented cloud table to pygirder.toml (appended if the file exists)."""
    import tomllib

    path = config_path(config)
    text = default_config_text(name=name, region=region, zone=zone, ssh_from=ssh_from or "")
    try:
        config_from_dict(tomllib.loads(text)["cloud"], source="the new [cloud] table")
    except CloudConfigError as exc:
        raise _fail(exc) from None
    existing = path.read_text(encoding="utf-8") if path.is_file() else None
    if existing is not None and _has_cloud_table(existing):
        if not force:
            raise _fail(
                CloudConfigError(
                    f"{path} already has a [cloud] table; edit it, or pass --force to replace it"
                )
            )
        existing = _without_cloud_table(existing)
    if existing and existing.strip():
        text = existing.rstrip("\n") + "\n\n" + text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    err.print(f"wrote the \\[cloud] table to [bold]{escape(str(path))}[/]")
    if not ssh_from:
        err.print(
            "[yellow]next:[/] set [bold]ssh_from[/] to your public address "
            '(e.g. "203.0.113.7/32"), then run [bold]pygirder cloud plan[/]'
        )
    else:
        err.print("[green]next:[/] run [bold]pygirder cloud plan[/], then [bold]setup[/]")


@app.command()
def plan(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Show what `setup` would create, change or delete.  Changes nothing."""
    from ..account import plan as run_plan

    cfg = _load(config)
    try:
        report = run_plan(cfg)
    except PygirderError as exc:
        raise _fail(exc) from None
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    _print_warnings(report)
    out.print(_plan_table(report, title=f"pygirder cloud plan: {_where(cfg)}"))
    changes = report.changes
    if report.conflicts:
        err.print(
            f"[bold red]{len(report.conflicts)} conflict(s):[/] setup will refuse until they "
            "are resolved (see Details)."
        )
        raise typer.Exit(1)
    if changes:
        counts = _counts(changes)
        err.print(f"setup would: {counts}. Run [bold]pygirder cloud setup[/] to apply.")
    else:
        err.print("[green]Everything is set up as configured; setup has nothing to do.[/]")


@app.command()
def setup(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Create the missing account resources and fix drifted ones (idempotent)."""
    from ..account import setup as run_setup

    cfg = _load(config)
    try:
        report = run_setup(cfg, progress=None if as_json else _progress)
    except PygirderError as exc:
        items = getattr(exc, "items", None)
        if items and not as_json:
            from ..account import Report

            out.print(_plan_table(Report("setup", items=items), title="conflicts"))
        raise _fail(exc) from None
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    _print_warnings(report)
    out.print(_plan_table(report, title=f"pygirder cloud setup: {_where(cfg)}", done=True))
    if report.changes:
        err.print(f"[green]done:[/] {_counts(report.changes, done=True)}.")
    else:
        err.print("[green]Nothing to do: everything was already set up as configured.[/]")
    err.print("See what it costs while idle with [bold]pygirder cloud status[/].")


@app.command()
def status(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Show every resource, its state and the monthly cost of what is left running."""
    from ..account import status as run_status

    cfg = _load(config)
    try:
        report = run_status(cfg)
    except PygirderError as exc:
        raise _fail(exc) from None
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    _print_warnings(report)
    out.print(_status_table(report, title=f"pygirder cloud status: {_where(cfg)}"))
    missing = [i for i in report.items if i.state == "missing"]
    if missing:
        err.print(
            f"[yellow]{len(missing)} resource(s) missing:[/] run [bold]pygirder cloud setup[/]."
        )


@app.command()
def teardown(
    config: ConfigOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Also terminate live fleet instances.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Delete every resource of this setup (bucket contents included), then prove it."""
    from ..account import teardown as run_teardown
    from ..aws import Aws

    cfg = _load(config)
    aws = Aws(cfg)
    if not yes:
        if not sys.stdin.isatty():
            raise _fail(
                CloudConfigError(
                    "teardown deletes everything: confirm with --yes when not at a terminal"
                )
            )
        try:
            account = aws.account_id
        except PygirderError as exc:
            raise _fail(exc) from None
        typer.confirm(
            f"Delete every AWS resource of pygirder setup {cfg.name!r} in account {account} "
            f"({cfg.region} and {'us-east-1' if cfg.region != 'us-east-1' else 'billing'}), "
            f"including all objects in the artifact bucket?",
            abort=True,
        )
    try:
        report = run_teardown(cfg, aws=aws, force=force, progress=None if as_json else _progress)
    except PygirderError as exc:
        raise _fail(exc) from None
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        raise typer.Exit(0 if report.ok else 1)
    _print_warnings(report)
    if report.items:
        out.print(_plan_table(report, title=f"pygirder cloud teardown: {_where(cfg)}", done=True))
    else:
        err.print("nothing to delete.")
    for item in report.failures:
        err.print(
            f"[bold red]failed:[/] {escape(item.title)} {escape(item.id)}: {escape(item.detail)}"
        )
    if report.remaining:
        err.print("[bold red]still tagged after teardown:[/]")
        for line in report.remaining:
            err.print(f"  - {escape(line)}")
        err.print("Run [bold]pygirder cloud teardown[/] again in a minute; AWS may be slow.")
        raise typer.Exit(1)
    err.print(
        f"[green]verified:[/] nothing tagged pygirder:name={escape(cfg.name)} is left "
        "(checked every resource kind and the tagging API)."
    )


@app.command()
def policy(
    config: ConfigOption = None,
    boundary: bool = typer.Option(
        False, "--boundary", help="Print the permissions boundary of pygirder's roles instead."
    ),
) -> None:
    """Print the IAM policy an operator needs for every `pygirder cloud` command."""
    from ..policy import boundary_policy, operator_policy, partition

    bucket, part = None, "aws"
    try:
        cfg = load_config(config)
        bucket, part = cfg.bucket, partition(cfg.region)
    except CloudConfigError:
        if config is not None:  # an explicit but broken config is worth an error
            raise _fail(CloudConfigError(f"cannot read {config}")) from None
    if boundary:
        print(json.dumps(boundary_policy(part), indent=2))
        return
    print(json.dumps(operator_policy(bucket=bucket, partition_name=part), indent=2))
    err.print(
        "[dim]Attach this to the IAM user or role you run pygirder with, e.g.\n"
        "  pygirder cloud policy > pygirder-policy.json\n"
        "  aws iam create-policy --policy-name pygirder-operator "
        "--policy-document file://pygirder-policy.json[/]"
    )


# ---------------------------------------------------------------- rendering


def _load(path: Path | None) -> CloudConfig:
    try:
        return load_config(path)
    except CloudConfigError as exc:
        raise _fail(exc) from None


def _where(cfg: CloudConfig) -> str:
    return f"{cfg.name!r} in {cfg.region} ({cfg.zone})"


def _print_warnings(report: Report) -> None:
    for warning in report.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}")


def _counts(items: list, *, done: bool = False) -> str:
    counts: dict[str, int] = {}
    for item in items:
        counts[item.action.value] = counts.get(item.action.value, 0) + 1
    return ", ".join(f"{n} {_PAST.get(a, a) if done else a}" for a, n in counts.items())


def _plan_table(report: Report, *, title: str, done: bool = False) -> Table:
    rows = []
    for item in report.items:
        action = item.action.value if item.action else ""
        if done and item.action is not None:
            action = _PAST.get(action, action)
        style = _ACTION_STYLE.get(item.action.value if item.action else "", "")
        rows.append(
            (
                escape(item.title),
                _name_cell(item),
                f"[{style}]{escape(action)}[/]" if style else escape(action),
                escape(item.detail),
            )
        )
    headers = ("Resource", "Name / id", "Done" if done else "Action", "Details")
    return _table(title, headers, rows, keep=3)


_PAST = {"create": "created", "update": "updated", "replace": "replaced", "delete": "deleted"}


def _table(
    title: str, headers: tuple[str, ...], rows: Sequence[tuple[str, ...]], keep: int
) -> Table:
    """A table without the columns that are empty in every row (beyond the first
    ``keep``), so what matters gets the width; only the last column wraps."""
    shown = [i for i in range(len(headers)) if i < keep or any(row[i] for row in rows)]
    table = Table(title=title, title_justify="left", expand=False)
    for i in shown:
        table.add_column(headers[i], no_wrap=i != shown[-1], overflow="fold")
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    return table


def _status_table(report: Report, *, title: str) -> Table:
    table = Table(title=title, title_justify="left", expand=False, show_footer=True)
    table.add_column("Resource", no_wrap=True, footer="Idle cost")
    table.add_column("Name / id", no_wrap=True)
    table.add_column("State", no_wrap=True)
    table.add_column(
        "$/month", justify="right", no_wrap=True, footer=f"${report.total_monthly_usd:,.2f}"
    )
    table.add_column("Details", overflow="fold")
    unknown = False
    for item in report.items:
        if item.monthly_usd is None:
            cost, unknown = "?", True
        elif item.state == "missing":
            cost = ""
        else:
            cost = f"{item.monthly_usd:,.2f}"
        style = _STATE_STYLE.get(item.state, "")
        state = f"[{style}]{escape(item.state)}[/]" if style else escape(item.state)
        table.add_row(escape(item.title), _name_cell(item), state, cost, escape(item.detail))
    table.caption = "Costs: us-east-1 list prices, excluding usage (requests, data transfer)." + (
        " '?': price unknown for that instance type." if unknown else ""
    )
    return table


def _name_cell(item) -> str:
    """The resource's name, and below it (dimmed) its id when the name is not it."""
    short = _short_id(item)
    return escape(item.name) + (f"\n[dim]{escape(short)}[/]" if short else "")


def _short_id(item) -> str:
    """The id a person needs next to the name: none when the name says it all,
    the resource part of an ARN, nothing for URLs (``--json`` has everything)."""
    rid = item.id
    if not rid or rid == item.name or rid.startswith(("http://", "https://")):
        return ""
    if rid.startswith("arn:"):
        tail = re.split(r"[:/]", rid)[-1]
        if _UUID_RE.match(tail):
            return tail[:8] + "…"
        return "" if tail == item.name else tail
    return rid


_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


# ---------------------------------------------------------------- init helpers

_HEADER_RE = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(#.*)?$")


def _table_of(line: str) -> str | None:
    match = _HEADER_RE.match(line)
    return match.group(1).replace('"', "").replace("'", "").strip() if match else None


def _has_cloud_table(text: str) -> bool:
    return any(_table_of(line) == "cloud" for line in text.splitlines())


def _without_cloud_table(text: str) -> str:
    """``text`` without its [cloud] and [cloud.*] tables (and the comment above them)."""
    lines = text.splitlines()
    keep: list[str] = []
    inside = False
    for line in lines:
        table = _table_of(line)
        if table is not None:
            inside = table == "cloud" or table.startswith("cloud.")
            if inside:
                while keep and keep[-1].lstrip().startswith("#"):
                    keep.pop()
        if not inside:
            keep.append(line)
    return "\n".join(keep).strip("\n") + ("\n" if keep else "")


fleet_cli.register(app)  # up, fleet, cost, tunnel, run, exec, ssh, logs, down, sweep, rehearse
