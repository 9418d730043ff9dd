"""The on-instance agent: announce the instance, install the artifact, run and guard its service.

Every pygirder instance runs this from its user-data (see ``userdata.py``)::

    python -m pygirder.cloud.instance.agent announce --topic-arn ARN --launch-id L \\
        --role worker --event up
    python -m pygirder.cloud.instance.agent fetch-artifact s3://bucket/artifacts/<sha>.tar.gz \\
        --sha256 <sha> --venv ~/pygirder/venv
    ~/pygirder/venv/bin/python -m pygirder.cloud.instance.agent run worker \\
        --redis redis://10.0.1.5:6379 ...
    # after a failure:
    python -m pygirder.cloud.instance.agent wait-expiry --expires 2026-01-01T12:00:00Z

Each command is a service (:mod:`pygirder.service`, the wrapper every process uses): it takes
``--log-level``, ``--id``, ``--opts`` and ``--json``, and a failure ends with
``error: <type>: <message>`` on stderr and exit status 1 (2 for bad options).

What it talks to:

- **IMDSv2** at ``http://169.254.169.254``, or at ``$PYGIRDER_IMDS_ENDPOINT`` (the one
  seam; a simulated instance sets it to an :class:`~pygirder.cloud.sim.imds.ImdsEmulator`).
  A session token is fetched first and renewed on 401.
- **SNS**: one JSON :class:`Announcement` per event (``up``, ``ready``, ``going-away``,
  ``rebalance``, ``failed``) on the fleet's status topic, whose region is read from the
  topic ARN.
- **SSM**: the Redis password, a SecureString at ``/pygirder/<name>/<fleet>/redis-password``,
  read at run time with the instance role and never written to a log or argv of ours.
- **S3**: the artifact (see :mod:`.install`).

``run ROLE`` supervises one child, started as ``<this python> -m pygirder <role command>``
(so running the agent from the artifact's venv runs the artifact's pygirder):

- ``redis``: ``pygirder server --bind <private ip> --port 6379 --password-file FILE``;
  ready once it answers PING with the password.
- ``distributor``: ``pygirder distributor --pool CHILD --parent PARENT``;
- ``worker``: ``pygirder worker --pool NAME --processes auto --import M...``;
  both get the Redis URL, password included, in ``PYGIRDER_REDIS`` (the environment
  variable behind their ``--redis``) so it never shows in ``ps`` or in a log, and are
  ready once the child has stayed up for ``--ready-grace`` seconds (a crash at import
  or connect time happens well within it).

The child is restarted with exponential backoff when it exits; after ``--max-restarts``
quick failures in a row the agent gives up with exit status 1 (the user-data then
announces ``failed``).  SIGTERM/SIGINT to the agent are forwarded to the child.  Two
watchers run beside it: the **spot watcher** polls ``spot/instance-action`` (every
``--spot-interval`` s) and on a notice SIGTERMs the child (a worker hands back what it
holds) and announces ``going-away``; it also polls
``events/recommendations/rebalance`` and announces a rebalance recommendation as
``rebalance`` once, the service serving on (the fleet controller replaces the instance,
then drains it); the **time-to-live** (``--ttl`` or ``--expires``)
announces ``going-away``, stops the child and runs ``--shutdown-command`` (default
``sudo shutdown -h now``; instances are launched with shutdown behaviour
*terminate*), so a lost laptop never leaves a bill running.  On a simulated instance
(``PYGIRDER_IMDS_ENDPOINT`` set) the default shutdown command is never run: only an
explicit ``--shutdown-command`` is.

A worker's or distributor's agent also polls the grid's Redis for a drain request
(:mod:`.drain`): it SIGTERMs the service, announces ``going-away`` ("drained: ...")
and, once the service has exited, records that it drained, so whoever shrinks the
fleet may terminate the instance.  With ``--controller-queue-url`` the redis role
runs the fleet controller (``python -m pygirder.cloud.fleet.controller``) as a second
supervised child beside the server.

The parts: :mod:`.common` (roles, events, seams), :mod:`.metadata` (IMDSv2),
:mod:`.announce` (announcements, SNS and SSM calls), :mod:`.install` (the artifact's
virtual environment), :mod:`.supervisor` (the child and its watchers); this module
runs them and is the command line.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from ...errors import ConfigError
from ...service import service
from ..errors import AgentError
from .announce import (
    Announcement,
    Announcer,
    publish_announcement,
    read_redis_password,
    redis_password_parameter,
    region_of_arn,
)
from .common import (
    DEFAULT_IMDS_ENDPOINT,
    DEFAULT_REDIS_PORT,
    DEFAULT_SHUTDOWN_COMMAND,
    DEFAULT_SPOT_INTERVAL_S,
    Event,
    Role,
    _iso,
    _utcnow,
)
from .drain import DEFAULT_DRAIN_POLL_S, DrainWatcher
from .follow import GridFollower, current_address, follower_for
from .metadata import ImdsClient, InstanceMetadata
from .supervisor import (
    DeadlineWatcher,
    ReadyProbe,
    SpotWatcher,
    Supervisor,
    _Watcher,
    alive_for,
    redis_answers,
    resolve_expiry,
    service_command,
    service_environment,
    shut_down,
)

__all__ = [
    "DEFAULT_IMDS_ENDPOINT",
    "DEFAULT_SHUTDOWN_COMMAND",
    "AgentError",
    "Announcement",
    "Announcer",
    "Event",
    "ImdsClient",
    "InstanceMetadata",
    "Role",
    "Supervisor",
    "app",
    "main",
    "publish_announcement",
    "read_redis_password",
    "redis_password_parameter",
    "run_service",
    "service_command",
    "service_environment",
]

log = logging.getLogger("pygirder.agent")


# -- run ---------------------------------------------------------------------------------
@dataclass
class RunOptions:
    """Everything ``agent run`` needs; the CLI fills it, tests build it directly."""

    role: Role
    topic_arn: str
    launch_id: str
    fleet: str = ""
    name: str = ""
    redis: str | None = None
    port: int = DEFAULT_REDIS_PORT
    pool: str = "default"
    parent: str | None = None
    imports: tuple[str, ...] = ()
    processes: str = "auto"
    expires: datetime | None = None
    shutdown_command: str | None = None
    spot_interval_s: float = DEFAULT_SPOT_INTERVAL_S
    ready_grace_s: float = 2.0
    max_restarts: int = 5
    stop_timeout_s: float = 30.0
    region: str | None = None
    store: str = ""  # a worker's durable result store (PYGIRDER_STORE of its service)
    controller_queue_url: str | None = None
    """On the redis role: run the fleet controller too, reading this status queue."""
    drain_poll_s: float = DEFAULT_DRAIN_POLL_S


def _redis_service(
    opts: RunOptions, meta: InstanceMetadata, password: str | None, workdir: Path
) -> tuple[list[str], ReadyProbe]:
    password_file = None
    if password:
        password_file = workdir / "redis-password"
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password)
    command = service_command(
        Role.REDIS, bind=meta.private_ip, port=opts.port, password_file=password_file
    )
    return command, redis_answers(meta.private_ip, opts.port, password)


def run_service(
    opts: RunOptions,
    *,
    imds: ImdsClient | None = None,
    command: Sequence[str] | None = None,
    ready_probe: ReadyProbe | None = None,
    handle_signals: bool = True,
    supervisor_hook: Callable[[Supervisor], None] | None = None,
) -> int:
    """Announce, supervise the role's service and guard the instance; returns an exit status.

    ``command`` and ``ready_probe`` replace the role's own (for tests of the supervision
    with a stand-in child; the CLI never passes them).  ``supervisor_hook`` sees the
    supervisor before it starts.
    """
    imds = imds or ImdsClient()
    meta = imds.metadata()
    region = opts.region or region_of_arn(opts.topic_arn)
    announcer = Announcer(
        opts.topic_arn, launch_id=opts.launch_id, role=str(opts.role), meta=meta, fleet=opts.fleet
    )
    if opts.expires is not None and opts.expires <= _utcnow():
        announcer.send(Event.GOING_AWAY, f"time-to-live ran out at {_iso(opts.expires)}")
        shut_down(opts.shutdown_command)
        return 0

    with tempfile.TemporaryDirectory(prefix="pygirder-agent-") as tmp:
        password = None
        env = dict(os.environ)
        on_exit: Callable[[int], object] | None = None
        recovery = None
        if command is None and opts.name and opts.fleet:
            password = read_redis_password(opts.name, opts.fleet, region=region)
        if command is None:
            if opts.role is Role.REDIS:
                command, probe = _redis_service(opts, meta, password, Path(tmp))
            else:
                if opts.name and opts.fleet:  # the redis node may have been replaced
                    opts.redis = current_address(opts.name, opts.fleet, opts.redis, region=region)
                env.update(service_environment(opts.role, opts.redis, password))
                if opts.store:
                    env["PYGIRDER_STORE"] = opts.store
                command = service_command(
                    opts.role, pool=opts.pool, parent=opts.parent, imports=opts.imports,
                    processes=opts.processes,
                )  # fmt: skip
                probe = alive_for(opts.ready_grace_s)
                from ...grid.recovery import DeadChildRecovery

                on_exit = recovery = DeadChildRecovery(env["PYGIRDER_REDIS"])
            ready_probe = ready_probe or probe
        supervisor = Supervisor(
            command,
            env=env,
            ready_probe=ready_probe or alive_for(opts.ready_grace_s),
            on_ready=lambda: announcer.send(Event.READY, "service is up", once=True),
            max_restarts=opts.max_restarts,
            stop_timeout_s=opts.stop_timeout_s,
            on_exit=on_exit,
        )
        if supervisor_hook is not None:
            supervisor_hook(supervisor)
        expired = threading.Event()

        def on_spot(notice: dict[str, str]) -> None:
            # SIGTERM first: the two-minute warning is the worker's time to hand work back.
            supervisor.stop(f"spot interruption ({notice['action']} at {notice['time']})")
            announcer.send(
                Event.GOING_AWAY,
                f"spot interruption notice: {notice['action']} at {notice['time']}",
                once=True,
            )

        def on_rebalance(notice_time: str) -> None:
            # The service keeps serving: the fleet controller launches a replacement
            # first and drains this instance once the replacement serves.
            announcer.send(Event.REBALANCE, f"rebalance recommendation at {notice_time}", once=True)

        def on_expiry() -> None:
            expired.set()
            at = _iso(opts.expires) if opts.expires is not None else "its deadline"
            announcer.send(Event.GOING_AWAY, f"time-to-live ran out at {at}", once=True)
            supervisor.stop("time-to-live ran out")

        watchers: list[_Watcher | DrainWatcher | GridFollower] = []
        if meta.lifecycle == "spot" and opts.spot_interval_s > 0:
            watchers.append(SpotWatcher(imds, on_spot, opts.spot_interval_s, on_rebalance))
        if opts.expires is not None:
            watchers.append(DeadlineWatcher(opts.expires, on_expiry))
        drain = _drain_watcher(opts, meta, password, supervisor, announcer)
        if drain is not None:
            watchers.append(drain)
        if recovery is not None and opts.redis and opts.name and opts.fleet:

            def moved(url: str) -> None:  # the drain and the recovery follow the grid too
                recovery.url = url
                if drain is not None:
                    drain.url = url

            follower = follower_for(
                name=opts.name, fleet=opts.fleet, region=region, url=opts.redis,
                password=password, supervisor=supervisor, moved=moved,
            )  # fmt: skip
            watchers.append(follower)
        controller = _controller(opts, meta, region, env)

        previous: dict[int, Any] = {}
        senders: list[threading.Thread] = []
        if handle_signals:

            def on_signal(signum: int, frame: object) -> None:
                name = signal.Signals(signum).name
                supervisor.stop(f"agent received {name}")
                # Publishing blocks: not in a signal handler.  Joined before exiting.
                sender = threading.Thread(
                    target=announcer.send,
                    args=(Event.GOING_AWAY, f"agent received {name}"),
                    kwargs={"once": True},
                    daemon=True,
                )
                sender.start()
                senders.append(sender)

            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, on_signal)
        try:
            for watcher in watchers:
                watcher.start()
            if controller is not None:
                controller.start()
            supervisor.run()
            if drain is not None and drain.requested.is_set():
                drain.confirm()  # the service has exited: the instance may be terminated
        finally:
            for watcher in watchers:
                watcher.cancel()
            if controller is not None:
                controller.cancel()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            for sender in senders:
                sender.join(60)
    if expired.is_set():
        shut_down(opts.shutdown_command)
    return 0


def _drain_watcher(
    opts: RunOptions,
    meta: InstanceMetadata,
    password: str | None,
    supervisor: Supervisor,
    announcer: Announcer,
) -> DrainWatcher | None:
    """Workers and distributors stop their service when the fleet drains them."""
    if opts.role is Role.REDIS or not opts.redis or not opts.fleet or opts.drain_poll_s <= 0:
        return None
    from .supervisor import with_password

    def on_drain(reason: str) -> None:
        supervisor.stop(f"drain requested: {reason}")
        announcer.send(Event.GOING_AWAY, f"drained: {reason}", once=True)

    url = with_password(opts.redis, password)
    return DrainWatcher(url, opts.fleet, meta.instance_id, on_drain, opts.drain_poll_s)


class _ControllerService(threading.Thread):
    """The fleet controller, supervised beside the redis node's server."""

    def __init__(self, supervisor: Supervisor) -> None:
        super().__init__(name="fleet-controller", daemon=True)
        self.supervisor = supervisor

    def run(self) -> None:
        try:
            self.supervisor.run()
        except AgentError as exc:  # the grid keeps serving; the fleet is no longer kept
            log.error("the fleet controller gave up: %s", exc)

    def cancel(self, timeout: float = 60.0) -> None:
        self.supervisor.stop("the redis node's service stopped")
        if self.is_alive():
            self.join(timeout)


def _controller(
    opts: RunOptions, meta: InstanceMetadata, region: str, env: dict[str, str]
) -> _ControllerService | None:
    if opts.role is not Role.REDIS or not opts.controller_queue_url or not opts.fleet:
        return None
    command = [
        sys.executable, "-m", "pygirder.cloud.fleet.controller", "--fleet", opts.fleet,
        "--name", opts.name, "--region", region, "--queue-url", opts.controller_queue_url,
        "--redis", f"redis://{meta.private_ip}:{opts.port}/0",
    ]  # fmt: skip
    supervisor = Supervisor(
        command, env=env, ready_probe=alive_for(opts.ready_grace_s),
        max_restarts=opts.max_restarts, stop_timeout_s=opts.stop_timeout_s,
    )  # fmt: skip
    return _ControllerService(supervisor)


def wait_for_expiry(
    expires: datetime, shutdown_command: str | None, announcer: Announcer | None
) -> int:
    """Sleep until ``expires``, then announce going-away and shut down."""
    while (remaining := (expires - _utcnow()).total_seconds()) > 0:
        time.sleep(min(remaining, 60.0))
    if announcer is not None:
        announcer.send(Event.GOING_AWAY, f"time-to-live ran out at {_iso(expires)}")
    return shut_down(shutdown_command)


# -- CLI -----------------------------------------------------------------------------------
# Every command is a service of the shared helper (DESIGN 6): --log-level, --id, --opts,
# --json (one envelope on stdout), and "error: <type>: <message>" with exit 1 on failure.
app = typer.Typer(
    name="pygirder-agent",
    help="The pygirder on-instance agent (run from an instance's user-data).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _quiet_aws_loggers() -> None:
    """botocore logs response bodies at DEBUG, SSM's decrypted password among them."""
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


TopicArn = Annotated[str, typer.Option("--topic-arn", help="The fleet's SNS status topic.")]
LaunchId = Annotated[str, typer.Option("--launch-id", help="Id of the launch (pygirder cloud up).")]
Fleet = Annotated[str, typer.Option("--fleet", help="Fleet id (tags, SSM parameter path).")]
ShutdownCommand = Annotated[
    str | None, typer.Option(help=f"Run at expiry (default: {DEFAULT_SHUTDOWN_COMMAND}).")
]


@service(app)
def announce(
    topic_arn: TopicArn,
    launch_id: LaunchId,
    role: Annotated[str, typer.Option("--role", help="redis, distributor or worker.")],
    event: Annotated[Event, typer.Option("--event", help="What happened.")],
    detail: Annotated[str, typer.Option("--detail", help="Free text, e.g. an error.")] = "",
    fleet: Fleet = "",
) -> dict[str, str]:
    """Publish one status message about this instance on the status topic."""
    _quiet_aws_loggers()
    meta = ImdsClient().metadata()
    message = Announcement.make(
        event, launch_id=launch_id, role=role, meta=meta, fleet=fleet, detail=detail
    )
    return {"message_id": publish_announcement(topic_arn, message), "event": message.event}


@service(app, name="fetch-artifact")
def fetch_artifact(
    uri: Annotated[str, typer.Argument(help="s3://bucket/key of the artifact.")],
    sha256: Annotated[str, typer.Option("--sha256", help="Expected SHA-256 (hex).")],
    venv: Annotated[Path, typer.Option("--venv", help="Virtual environment to install into.")],
) -> dict[str, Any]:
    """Download the artifact, verify its hash and install it into a virtual environment."""
    from .install import install_artifact

    _quiet_aws_loggers()
    manifest = install_artifact(uri, sha256, venv)
    names = ", ".join(f"{w['name']} {w['version']}" for w in manifest["wheels"])
    log.info("artifact installed: %s", names)
    return {"venv": str(venv), "sha256": sha256, "wheels": manifest["wheels"]}


@service(app, stop="flag")
def run(
    role: Annotated[Role, typer.Argument(help="The service to run.")],
    topic_arn: TopicArn,
    launch_id: LaunchId,
    fleet: Fleet = "",
    name: Annotated[str, typer.Option("--name", help="Deployment name (SSM path).")] = "",
    redis: Annotated[
        str | None, typer.Option("--redis", help="redis://HOST:PORT/DB of the grid's Redis node.")
    ] = None,
    port: Annotated[
        int, typer.Option(help="Port of the redis role's server.")
    ] = DEFAULT_REDIS_PORT,
    pool: Annotated[str, typer.Option(help="Pool of the workers / child pool.")] = "default",
    parent: Annotated[str | None, typer.Option(help="Parent pool of a distributor.")] = None,
    imports: Annotated[
        list[str] | None, typer.Option("--import", help="Module with grid functions (repeat).")
    ] = None,
    processes: Annotated[str, typer.Option(help="Worker processes, or auto.")] = "auto",
    store: Annotated[
        str, typer.Option(help="Workers' durable result store (s3://bucket/results).")
    ] = "",
    ttl: Annotated[
        float | None, typer.Option(help="Seconds until the instance shuts down.")
    ] = None,
    expires: Annotated[
        str | None, typer.Option(help="ISO time at which the instance shuts down.")
    ] = None,
    shutdown_command: ShutdownCommand = None,
    spot_interval: Annotated[
        float, typer.Option(help="Seconds between spot checks.")
    ] = DEFAULT_SPOT_INTERVAL_S,
    ready_grace: Annotated[
        float, typer.Option(help="Seconds a worker/distributor must stay up to be ready.")
    ] = 2.0,
    max_restarts: Annotated[
        int, typer.Option(help="Quick failures in a row before giving up.")
    ] = 5,
    region: Annotated[
        str | None, typer.Option(help="Region of SSM (default: the topic's).")
    ] = None,
    controller_queue_url: Annotated[
        str | None,
        typer.Option(help="redis role: also run the fleet controller, reading this queue."),
    ] = None,
) -> None:
    """Run the role's service: supervise it, watch for spot interruptions, honour the TTL."""
    _quiet_aws_loggers()
    opts = RunOptions(
        role=role, topic_arn=topic_arn, launch_id=launch_id, fleet=fleet, name=name,
        redis=redis, port=port, pool=pool, parent=parent, imports=tuple(imports or ()),
        processes=processes, expires=resolve_expiry(ttl, expires),
        shutdown_command=shutdown_command, spot_interval_s=spot_interval,
        ready_grace_s=ready_grace, max_restarts=max_restarts, region=region, store=store,
        controller_queue_url=controller_queue_url,
    )  # fmt: skip
    status = run_service(opts)
    if status:
        raise typer.Exit(status)


@service(app, name="wait-expiry")
def wait_expiry(
    ttl: Annotated[float | None, typer.Option(help="Seconds from now.")] = None,
    expires: Annotated[str | None, typer.Option(help="ISO time.")] = None,
    shutdown_command: ShutdownCommand = None,
    topic_arn: Annotated[str | None, typer.Option("--topic-arn")] = None,
    launch_id: Annotated[str, typer.Option("--launch-id")] = "",
    role: Annotated[str, typer.Option("--role")] = "",
    fleet: Fleet = "",
) -> None:
    """Wait until the time-to-live runs out, then announce going-away and shut down.

    The user-data hands over to this after a failure, so a broken instance stays up
    for inspection until its TTL and no longer.
    """
    _quiet_aws_loggers()
    when = resolve_expiry(ttl, expires)
    if when is None:
        raise ConfigError("wait-expiry needs --ttl or --expires")
    announcer = None
    if topic_arn:
        meta = ImdsClient().metadata()
        announcer = Announcer(topic_arn, launch_id=launch_id, role=role, meta=meta, fleet=fleet)
    status = wait_for_expiry(when, shutdown_command, announcer)
    if status:
        raise typer.Exit(status)


def main() -> None:
    app(prog_name="python -m pygirder.cloud.instance.agent")


if __name__ == "__main__":
    main()
