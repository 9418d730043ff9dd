"""``pygirder cloud simulate``: run the local data plane, interrupt its instances, show them.

The cloud CLI mounts :data:`app` as ``pygirder cloud simulate``.  Without a
subcommand it runs a :class:`~pygirder.cloud.sim.simulator.Simulator` in the foreground
until Ctrl-C, printing what its instances do and, at the end, their peak memory;
``interrupt`` and ``status`` talk to a running one through its state directory.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ...errors import PygirderError
from ..sim.simulator import DEFAULT_STATE_DIR, POLL_INTERVAL_S, STOP_GRACE_S

__all__ = ["app"]

app = typer.Typer(
    help=(
        "Run the pygirder instances of a local AWS endpoint (moto) as local process trees "
        "(without a command: until Ctrl-C)."
    ),
    add_completion=False,
    pretty_exceptions_enable=False,
)

out = Console(highlight=False, soft_wrap=False)
err = Console(stderr=True, highlight=False)

StateDirOpt = Annotated[
    Path,
    typer.Option(
        "--state-dir", help="Where instances live (HOME, logs) and the simulator's files."
    ),
]


def _fail(exc: Exception, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(str(exc))}")
    return typer.Exit(code)


@app.callback(invoke_without_command=True)
def simulate(
    ctx: typer.Context,
    endpoint: Annotated[
        str | None,
        typer.Option(
            "--endpoint",
            envvar="AWS_ENDPOINT_URL",
            help="The local AWS endpoint, e.g. http://127.0.0.1:5000 (moto_server).",
        ),
    ] = None,
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
    region: Annotated[str, typer.Option(help="Region whose instances to run.")] = "us-east-1",
    name: Annotated[
        str | None, typer.Option("--name", help="Only the instances of this setup (pygirder:name).")
    ] = None,
    stop_grace: Annotated[
        float, typer.Option(help="Seconds from SIGTERM to SIGKILL when an instance stops.")
    ] = STOP_GRACE_S,
    poll_interval: Annotated[
        float, typer.Option(help="Seconds between DescribeInstances polls.")
    ] = POLL_INTERVAL_S,
) -> None:
    """Run every running instance tagged pygirder:managed as local processes, until Ctrl-C."""
    if ctx.invoked_subcommand is not None:
        return
    if not endpoint:
        raise _fail(
            PygirderError(
                "give --endpoint URL (or AWS_ENDPOINT_URL) of a local AWS endpoint, e.g. start "
                "`moto_server -H 127.0.0.1 -p 5000` and pass http://127.0.0.1:5000"
            ),
            2,
        )
    from ..sim.simulator import SimInstance, Simulator

    def on_event(instance: SimInstance, message: str) -> None:
        role = instance.tags.get("pygirder:role", "")
        err.print(
            f"[bold]{escape(instance.instance_id)}[/] [dim]{escape(role)}[/] {escape(message)}"
        )

    sim = Simulator(
        endpoint, state_dir, region, name=name, stop_grace=stop_grace,
        poll_interval=poll_interval, on_event=on_event,
    )  # fmt: skip
    try:
        sim.start()
    except PygirderError as exc:
        raise _fail(exc) from None
    err.print(
        f"simulating the instances of [bold]{escape(sim.endpoint)}[/] in "
        f"{escape(str(sim.state_dir))}; Ctrl-C stops them (EC2 states are left as they are)"
    )
    done = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        err.print("stopping the simulated instances ...")
        sim.stop()
    instances = [i.to_dict() for i in sim.instances()]
    if instances:
        out.print(_table(instances, title="simulated instances"))


@app.command()
def interrupt(
    instance_id: Annotated[str, typer.Argument(help="The spot instance to interrupt.")],
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
    action: Annotated[
        str, typer.Option(help="terminate, stop or hibernate (what AWS will do).")
    ] = "terminate",
    in_seconds: Annotated[
        float, typer.Option("--in", help="Seconds from the notice to the reclaim.")
    ] = 120.0,
    reclaim: Annotated[
        bool, typer.Option(help="Reclaim the instance through the EC2 API when due.")
    ] = True,
) -> None:
    """Post a spot interruption notice to a simulated instance (and reclaim it when due)."""
    from ..sim.simulator import request_interrupt

    try:
        stamp = request_interrupt(
            instance_id, state_dir, action=action, in_seconds=in_seconds, reclaim=reclaim
        )
    except PygirderError as exc:
        raise _fail(exc) from None
    then = f"; it will be {action}d through the EC2 API" if reclaim else ""
    err.print(f"{escape(instance_id)}: spot interruption notice, {action} at {stamp}{then}")


@app.command()
def status(
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the simulated instances: state, private address, boots, peak memory."""
    path = Path(state_dir).expanduser() / "instances.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise _fail(PygirderError(f"no simulator state in {path.parent}")) from None
    if as_json:
        print(json.dumps(data, indent=2))
        return
    out.print(_table(data.get("instances", []), title=f"simulated instances of {data['endpoint']}"))


def _table(instances: list[dict[str, Any]], *, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for header in ("Instance", "Role", "State", "EC2", "Address", "Type", "Boots", "Peak RSS"):
        table.add_column(header, no_wrap=True)
    for inst in instances:
        rss = inst.get("peak_rss_bytes")
        table.add_row(
            escape(inst["instance_id"]),
            escape(inst.get("tags", {}).get("pygirder:role", "")),
            escape(inst["state"]),
            escape(inst["ec2_state"]),
            escape(inst["private_ip"]),
            escape(f"{inst['instance_type']} {inst['lifecycle']}"),
            str(inst["boots"]),
            f"{rss / 2**20:,.0f} MiB" if rss else "",
        )
    return table
