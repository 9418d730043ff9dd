"""``pygirder cloud up|fleet|cost|tunnel|run|exec|ssh|logs|down|sweep|rehearse``: the fleet.

:func:`register` adds these commands to the cloud app.  ``pygirder cloud status``
already names the account's resources and their idle cost, so the running fleet's
table is ``pygirder cloud fleet``.  Like the rest of the cloud CLI this module
imports without boto3; AWS code is imported inside the commands.  Tables go to
stdout (drawn by :mod:`.fleet_tables`), progress and errors to stderr; ``--json``
prints machine-readable output.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from ...cli.oneshot import ArgsOpt, KwargsOpt, TargetArg, print_json
from ...cli.service import ServiceContext, service
from ...errors import ConfigError, PygirderError
from .fleet_tables import (
    cost_table,
    leftovers_table,
    mem_available,
    orphans_table,
    rehearsal_tables,
    sizes_table,
    status_table,
    summary_dict,
    summary_table,
)

if TYPE_CHECKING:
    from ..config import CloudConfig

__all__ = ["register"]

out = Console(highlight=False, soft_wrap=False)
err = Console(stderr=True, highlight=False)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="pygirder.toml (default: $PYGIRDER_CONFIG, else ./pygirder.toml).",
        dir_okay=False,
    ),
]
FleetOpt = Annotated[
    str | None, typer.Option("--fleet", help="Fleet id (default: the only fleet that is up).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
ViaOpt = Annotated[
    str,
    typer.Option(
        "--via", help="Route to the redis node: auto (direct, ssh, ssm), direct, ssh or ssm."
    ),
]


def _fail(exc: Exception) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(str(exc))}")
    return typer.Exit(2 if isinstance(exc, ConfigError) else 1)


def _say(text: str) -> None:
    err.print(f"[dim]{escape(text)}[/]")


def _load(path: Path | None) -> CloudConfig:
    from ..config import load_config

    try:
        return load_config(path)
    except PygirderError as exc:
        raise _fail(exc) from None


def _duration(text: str, option: str) -> float:
    from ...grid.maintenance import parse_age

    try:
        return parse_age(text)
    except ConfigError as exc:
        raise _fail(ConfigError(f"{option} {text!r}: use e.g. 90s, 30m, 4h")) from exc


# --------------------------------------------------------------------------- up


def up(
    config: ConfigOpt = None,
    workers: Annotated[int, typer.Option("--workers", "-n", help="Worker instances.")] = 1,
    distributors: Annotated[int, typer.Option(help="Distributor instances.")] = 0,
    instance_types: Annotated[
        str | None,
        typer.Option("--instance-types", help="Comma-separated instance types to diversify over."),
    ] = None,
    max_price: Annotated[
        float | None, typer.Option(help="Highest spot price per instance-hour in USD.")
    ] = None,
    ttl: Annotated[str, typer.Option(help="Instances shut themselves down after this.")] = "4h",
    minimum: Annotated[
        int | None, typer.Option("--min", help="Fewest ready workers that will do (default 1).")
    ] = None,
    deadline: Annotated[
        str, typer.Option(help="Give up waiting for instances after this.")
    ] = "10m",
    imports: Annotated[
        list[str] | None,
        typer.Option("--import", help="Module the workers import (default: the project's)."),
    ] = None,
    processes: Annotated[
        str, typer.Option(help="Worker processes per instance, or auto.")
    ] = "auto",
    image: Annotated[
        list[str] | None,
        typer.Option(
            help="AMI to boot, one per architecture (default: the newest pygirder image of "
            "each role's architecture)."
        ),
    ] = None,
    redis_type: Annotated[
        str | None,
        typer.Option("--redis-type", help="The redis node's type (default: redis_instance_type)."),
    ] = None,
    artifact: Annotated[
        str | None, typer.Option(help="Artifact URI or SHA-256 prefix (default: the newest).")
    ] = None,
    public_workers: Annotated[
        bool, typer.Option(help="Put workers in the public subnet (no NAT needed).")
    ] = False,
    fleet: Annotated[
        str | None,
        typer.Option("--fleet", help="Grow or shrink this running fleet (default: the only one)."),
    ] = None,
    new: Annotated[
        bool, typer.Option("--new", help="Launch another fleet even if one is running.")
    ] = False,
    min_workers: Annotated[
        int | None,
        typer.Option("--min-workers", help="Follow the queue: fewest workers (may be 0)."),
    ] = None,
    max_workers: Annotated[
        int | None, typer.Option("--max-workers", help="Follow the queue: most workers.")
    ] = None,
    idle_minutes: Annotated[
        float, typer.Option("--idle-minutes", help="Idle this long before scaling down.")
    ] = 10.0,
    controller: Annotated[
        bool | None,
        typer.Option(
            "--controller/--no-controller",
            help="Keep the fleet at its target from its redis node (default: on when "
            "following the queue).",
        ),
    ] = None,
    launches_per_hour: Annotated[
        int, typer.Option(help="The controller's launch budget per hour.")
    ] = 60,
    as_json: JsonOpt = False,
) -> None:
    """Launch a spot fleet (a redis node, then distributors and workers, ready when they
    announce it), or grow or shrink the running one to the sizes given."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..fleet import DEFAULT_INSTANCE_TYPES, UpOptions
    from ..fleet import up as run_up

    cfg = _load(config)
    types = tuple(t.strip() for t in (instance_types or "").split(",") if t.strip())
    if (min_workers is None) != (max_workers is None):
        raise _fail(ConfigError("give both --min-workers and --max-workers, or neither"))
    scale = (
        (min_workers, max_workers) if min_workers is not None and max_workers is not None else None
    )
    running = None if new else _running_fleet(cfg, fleet)
    if running is not None:
        wait_s = _duration(deadline, "--deadline")
        _converge(cfg, running, workers, distributors, types, max_price, scale,
                  idle_minutes, launches_per_hour, wait_s, as_json)  # fmt: skip
        return
    options = UpOptions(
        workers=workers,
        distributors=distributors,
        instance_types=types or DEFAULT_INSTANCE_TYPES,
        max_price=max_price,
        ttl_s=_duration(ttl, "--ttl"),
        min_workers=minimum,
        deadline_s=_duration(deadline, "--deadline"),
        imports=tuple(imports) if imports else None,
        processes=processes,
        image_ids=tuple(image or ()),
        redis_instance_type=redis_type,
        artifact=artifact,
        public_workers=public_workers,
        controller=controller if controller is not None else scale is not None,
        scale=scale,
        idle_s=idle_minutes * 60,
        launches_per_hour=launches_per_hour,
    )
    bar = Progress(
        TextColumn("{task.description:>12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("ready [dim]({task.fields[launched]} launched)[/]"),
        TimeElapsedColumn(),
        console=err,
        disable=as_json,
    )
    tasks: dict[str, Any] = {}

    def progress(role: str, ready: int, requested: int, launched: int) -> None:
        if role not in tasks:
            tasks[role] = bar.add_task(role, total=requested, launched=launched)
        bar.update(tasks[role], completed=ready, total=requested, launched=launched)

    try:
        with bar:
            summary = run_up(
                cfg,
                options,
                say=(lambda t: bar.console.print(f"[dim]{escape(t)}[/]")),
                progress=progress,
            )
    except PygirderError as exc:
        raise _fail(exc) from None
    if as_json:
        print(json.dumps(summary_dict(summary), indent=2))
        return
    out.print(summary_table(summary, cfg.name, cfg.region))
    if summary.removed:
        err.print(
            f"[yellow]{len(summary.removed)} instance(s) were not ready in time and were "
            "terminated[/]"
        )
    err.print(
        "Next: [bold]pygirder cloud run MODULE:FUNC --args JSON[/], "
        "[bold]pygirder cloud fleet[/], [bold]pygirder cloud down[/]"
    )


def _running_fleet(cfg: CloudConfig, fleet: str | None) -> str | None:
    """The fleet ``up`` converges: ``--fleet``, else the only live one, else None."""
    from ..fleet import live_fleets

    try:
        if fleet:
            return fleet
        fleets = [f for f, insts in live_fleets(cfg).items() if insts]
    except PygirderError as exc:
        raise _fail(exc) from None
    if len(fleets) > 1:
        raise _fail(
            ConfigError(
                f"{len(fleets)} fleets are up ({', '.join(fleets)}): choose the one to grow "
                "or shrink with --fleet, or launch another with --new"
            )
        )
    return fleets[0] if fleets else None


def _converge(
    cfg: CloudConfig, fleet: str, workers: int, distributors: int, types: tuple[str, ...],
    max_price: float | None, scale: tuple[int, int] | None, idle_minutes: float,
    launches_per_hour: int, deadline_s: float, as_json: bool,
) -> None:  # fmt: skip
    from ..aws import Aws
    from ..fleet import DEFAULT_INSTANCE_TYPES
    from ..fleet.converge import Target, converge, read_target

    try:
        aws = Aws(cfg)
        old = read_target(aws, cfg.name, fleet)
        target = Target(
            workers=workers, distributors=distributors,
            min_workers=scale[0] if scale else None, max_workers=scale[1] if scale else None,
            idle_s=idle_minutes * 60, max_launches_per_hour=launches_per_hour,
            instance_types=types or (old.instance_types if old else DEFAULT_INSTANCE_TYPES),
            max_price=max_price if max_price is not None else (old.max_price if old else None),
            subnets=old.subnets if old else {},
        )  # fmt: skip
        report = converge(
            cfg, fleet, target, aws=aws, say=lambda t: err.print(f"[dim]{escape(t)}[/]"),
            deadline_s=deadline_s,
        )  # fmt: skip
    except PygirderError as exc:
        raise _fail(exc) from None
    if scale is not None and not target.controller:
        report.problems.append(
            f"fleet {fleet} runs no controller, so nothing follows the queue between "
            "--min-workers and --max-workers: launch a fleet with them (`pygirder cloud up "
            "--new --min-workers M --max-workers X`) for that"
        )
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    out.print(sizes_table(fleet, report.sizes))
    if not report.changed:
        err.print("already at the target: nothing changed")
    for problem in report.problems:
        err.print(f"[yellow]{escape(problem)}[/]")


# ----------------------------------------------------------------- fleet, cost


def fleet(config: ConfigOpt = None, fleet: FleetOpt = None, as_json: JsonOpt = False) -> None:
    """The running fleet: role, instance, state, address, uptime, spot price, cost so far,
    and each role's target against what runs."""
    from ..aws import Aws
    from ..fleet import fleet_status
    from ..fleet.converge import role_sizes

    cfg = _load(config)
    try:
        aws = Aws(cfg)
        status = fleet_status(cfg, fleet, aws=aws)
        sizes = role_sizes(aws, cfg.name, status.fleet)
    except PygirderError as exc:
        raise _fail(exc) from None
    lost = any(s.role == "redis" and s.live == 0 for s in sizes)
    if as_json:
        print(json.dumps({**status.to_dict(), "roles": [s.to_dict() for s in sizes]}, indent=2))
        return
    out.print(status_table(status))
    out.print(sizes_table(status.fleet, sizes))
    if lost:
        err.print(
            f"[red]the redis node of fleet {status.fleet} is lost, and the grid with it: "
            f"the calls in flight are gone. `pygirder cloud up --fleet {status.fleet}` "
            "launches a replacement (the fleet's controller ran on it, so nothing else "
            "will); the workers follow it, and calls they finished come back from the "
            "durable store when a job is submitted again.[/]"
        )


def cost(config: ConfigOpt = None, fleet: FleetOpt = None, as_json: JsonOpt = False) -> None:
    """What the fleet costs: per role per hour, so far, and until it expires."""
    from ..fleet import fleet_cost

    cfg = _load(config)
    try:
        found = fleet_cost(cfg, fleet)
    except PygirderError as exc:
        raise _fail(exc) from None
    if as_json:
        print(json.dumps(found, indent=2))
        return
    out.print(cost_table(found))


# -------------------------------------------------------------- reaching the grid


def tunnel(
    config: ConfigOpt = None,
    fleet: FleetOpt = None,
    via: ViaOpt = "auto",
    local_port: Annotated[int, typer.Option(help="Local port (default: a free one).")] = 0,
    show_password: Annotated[
        bool, typer.Option(help="Print the URL with the grid's password.")
    ] = False,
) -> None:
    """Forward a local port to the fleet's redis node until Ctrl-C."""
    import signal
    import threading

    from ..fleet import grid_url
    from ..instance.common import mask_url

    cfg = _load(config)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with grid_url(cfg, fleet, via=via, local_port=local_port) as url:
            shown = url if show_password else mask_url(url)
            print(f"PYGIRDER_REDIS={shown}", flush=True)
            err.print("the grid is reachable at that URL; Ctrl-C closes the tunnel")
            try:
                while not stop.wait(1.0):
                    pass
            except KeyboardInterrupt:
                pass
    except PygirderError as exc:
        raise _fail(exc) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(
    ctx: ServiceContext,
    target: TargetArg,
    args: ArgsOpt = "[]",
    kwargs: KwargsOpt = "{}",
    project: Annotated[
        Path, typer.Option(help="Where MODULE is found (the pushed project).", file_okay=False)
    ] = Path("."),
    timeout: Annotated[float | None, typer.Option(help="Seconds to wait for the result.")] = None,
    config: ConfigOpt = None,
    fleet: FleetOpt = None,
    via: ViaOpt = "auto",
) -> Any:
    """Run one call on the fleet's grid and print its result as JSON.

    Exit codes: 0 the result was printed, 1 the call or the fleet failed
    (the error on stderr), 2 a bad command line or pygirder.toml.
    With --json: one envelope {"result", "error", "time_s", "id", "log"},
    as `pygirder submit --json` prints.
    """
    import pygirder

    from ...cli.oneshot import load_grid_function, parse_call_arguments, run_one_call
    from ..config import load_config
    from ..fleet import grid_url

    func = load_grid_function(target, str(project.resolve()))
    pos, kw = parse_call_arguments(args, kwargs)
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from None
    with grid_url(cfg, fleet, via=via) as url, pygirder.connect(url) as grid:
        return run_one_call(ctx, grid, func(*pos, **kw), timeout)  # type: ignore[operator]


def exec_(
    role: Annotated[str, typer.Argument(help="redis, distributor, worker, or all.")],
    command: Annotated[list[str], typer.Argument(help="The command (after --).")],
    config: ConfigOpt = None,
    fleet: FleetOpt = None,
    data_plane: Annotated[
        Path | None,
        typer.Option(
            "--data-plane",
            help="State directory of `pygirder cloud simulate`: run "
            "inside the simulated instances instead of over SSH.",
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per instance.")] = 300.0,
    as_json: JsonOpt = False,
) -> None:
    """Run a command on every instance of a role; print each instance's output."""
    from ..fleet import exec_role

    cfg = _load(config)
    runner = None
    if data_plane is not None:
        from ..sim.rehearse import simulated_runner

        runner = simulated_runner(data_plane)
    try:
        results = exec_role(cfg, role, command, fleet=fleet, runner=runner, timeout=timeout)
    except PygirderError as exc:
        raise _fail(exc) from None
    if as_json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        for r in results:
            style = "green" if r.returncode == 0 else "red"
            out.print(
                f"[bold]── {r.role} {r.instance_id} ({r.address})[/] "
                f"[{style}]exit {r.returncode}[/] [dim]{r.seconds:.1f}s[/]"
            )
            if r.stdout:
                out.print(escape(r.stdout.rstrip()))
            if r.stderr:
                err.print(f"[dim]{escape(r.stderr.rstrip())}[/]")
    if any(r.returncode for r in results):
        raise typer.Exit(1)


def ssh(
    instance: Annotated[str, typer.Argument(help="Instance id (see `pygirder cloud fleet`).")],
    command: Annotated[list[str] | None, typer.Argument(help="Command to run (after --).")] = None,
    config: ConfigOpt = None,
    dry_run: Annotated[bool, typer.Option(help="Print the ssh command instead.")] = False,
) -> None:
    """Open SSH to one instance (through the redis node when it has no public address)."""
    import shlex

    from ..aws import Aws
    from ..fleet import instance_row, ssh_command

    cfg = _load(config)
    try:
        row, jump = instance_row(cfg, instance, aws=Aws(cfg))
        argv = ssh_command(cfg, row, jump, command or ())
    except PygirderError as exc:
        raise _fail(exc) from None
    if dry_run:
        print(shlex.join(argv))
        return
    os.execvp(argv[0], argv)


def logs(
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new records.")
    ] = False,
    level: Annotated[str | None, typer.Option(help="Minimum level.")] = None,
    request: Annotated[str | None, typer.Option(metavar="ID", help="Only this request.")] = None,
    lines: Annotated[int, typer.Option("--lines", "-n", min=0, help="Past records first.")] = 20,
    config: ConfigOpt = None,
    fleet: FleetOpt = None,
    via: ViaOpt = "auto",
) -> None:
    """The grid-wide log stream of the fleet (`pygirder logs` against its redis node)."""
    from ...cli.logs import logs_command
    from ..fleet import grid_url

    cfg = _load(config)
    try:
        with grid_url(cfg, fleet, via=via) as url:
            logs_command(
                follow=follow,
                level=level,
                request=request,
                redis_url=url,
                namespace="default",
                lines=lines,
            )
    except PygirderError as exc:
        raise _fail(exc) from None


# --------------------------------------------------------------------- down, sweep


def down(
    config: ConfigOpt = None,
    fleet: FleetOpt = None,
    all_fleets: Annotated[bool, typer.Option("--all", help="Every fleet of this setup.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Terminate the fleet and remove everything it created, then prove it."""
    from ..fleet import down as run_down

    cfg = _load(config)
    try:
        report = run_down(cfg, fleet, all_fleets=all_fleets, say=_say)
    except PygirderError as exc:
        raise _fail(exc) from None
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        raise typer.Exit(0 if report.clean else 1)
    for fl, left in report.leftovers.items():
        out.print(leftovers_table(fl, left))
    if not report.fleets:
        err.print(f"no fleet of {cfg.name!r} is up: nothing to remove.")
    if report.nat:
        err.print(f"NAT instance: {escape(report.nat)}")
    for failure in report.failures:
        err.print(f"[bold red]failed:[/] {escape(failure)}")
    if not report.clean:
        err.print("Run [bold]pygirder cloud down[/] again in a minute; AWS may be slow.")
        raise typer.Exit(1)
    if report.fleets:
        err.print(f"[green]verified:[/] nothing billable of {', '.join(report.fleets)} is left.")


def sweep(
    config: ConfigOpt = None,
    older_than: Annotated[
        str, typer.Option(help="Only what is at least this old (expired instances: always).")
    ] = "2h",
    yes: Annotated[
        bool, typer.Option("--yes", help="Remove the orphans (default: only list).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Find orphaned fleet resources of any pygirder setup in the region; --yes removes them."""
    from ..fleet import sweep as run_sweep

    cfg = _load(config)
    try:
        report = run_sweep(cfg, _duration(older_than, "--older-than"), yes=yes, say=_say)
    except PygirderError as exc:
        raise _fail(exc) from None
    if as_json:
        found = {
            "dry_run": report.dry_run,
            "orphans": [o.to_dict() for o in report.orphans],
            "deleted": report.deleted,
            "failures": report.failures,
        }
        print(json.dumps(found, indent=2))
        raise typer.Exit(1 if report.failures else 0)
    if not report.orphans:
        err.print(f"[green]no orphaned fleet resources in {cfg.region}[/]")
        return
    out.print(orphans_table(report, cfg.region))
    for failure in report.failures:
        err.print(f"[bold red]failed:[/] {escape(failure)}")
    if report.dry_run:
        err.print("Nothing was changed. Remove them with [bold]pygirder cloud sweep --yes[/].")
    elif report.failures:
        raise typer.Exit(1)
    else:
        err.print(f"[green]removed {len(report.deleted)} orphaned resources[/]")


# ------------------------------------------------------------------------ rehearse


def rehearse(
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            "-n",
            help="Simulated worker instances (2 or more: one is reclaimed mid-job).",
        ),
    ] = 4,
    state_dir: Annotated[
        Path | None, typer.Option(help="Keep the instances' homes and logs here (default: temp).")
    ] = None,
    job_seconds: Annotated[float, typer.Option(help="About how long the job runs.")] = 8.0,
    elastic: Annotated[
        bool,
        typer.Option(
            help="Also rehearse the fleet controller: reclaim and replace, grow and shrink "
            "mid-job, scale to zero and back."
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """The whole flow on a local moto server and the local data plane, with a timeline."""
    from ..errors import RehearsalError
    from ..sim.rehearse import rehearse as run_rehearsal

    started = datetime.now(UTC)
    try:
        report = run_rehearsal(
            workers,
            state_dir=state_dir,
            job_seconds=job_seconds,
            elastic=elastic,
            say=None if as_json else _say,
        )
    except RehearsalError as exc:
        report = exc.report
        err.print(f"[bold red]rehearsal failed:[/] {escape(str(exc))}")
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        raise typer.Exit(0 if report.ok else 1)
    for table in rehearsal_tables(report, workers, started):
        out.print(table)
    if report.peak_rss:
        worker_peak = max(report.peak_rss.get("worker", [0]))
        available = mem_available()
        if worker_peak and available:
            fits = int(available * 0.8 // worker_peak)
            err.print(
                f"this machine has {available / 2**30:.1f} GiB available: memory alone "
                f"allows about {fits} simulated workers"
            )
    if not report.ok:
        raise typer.Exit(1)


# ------------------------------------------------------------------------ mounting


def register(app: typer.Typer) -> None:
    """Add the fleet commands to the cloud app."""
    app.command("up")(up)
    app.command("fleet")(fleet)
    app.command("cost")(cost)
    app.command("tunnel")(tunnel)
    service(app, name="run", render=print_json)(run)
    app.command("exec")(exec_)
    app.command("ssh")(ssh)
    app.command("logs")(logs)
    app.command("down")(down)
    app.command("sweep")(sweep)
    app.command("rehearse")(rehearse)
