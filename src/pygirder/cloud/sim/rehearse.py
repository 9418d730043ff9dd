"""The whole fleet flow rehearsed on one machine: moto in server mode plus the local data plane.

``pygirder cloud rehearse --workers N`` starts a moto server on 127.0.0.1 (port 0)
in this process, points boto3 at it, and then runs, for real, what a user runs
against AWS: account setup, the image (when the image command is installed), an
artifact push, ``up`` (one redis node, one distributor, N workers), a re-entrant job
through the fleet's grid with a spot interruption of one worker while it runs,
``exec`` on every worker, ``down``, the proof that nothing of the fleet is left, a
second fleet that answers the same job from the first fleet's durable results in S3
without executing anything, its ``down``, and the account teardown.  Each instance
is a local process tree run by the :class:`~pygirder.cloud.sim.simulator.Simulator`:
the very user-data a real instance gets,
with its own IMDSv2, on its own loopback address, announcing itself through SNS to
the status queue.  Only the operating system image is not exercised.

What a rehearsal cannot show: real spot capacity (moto fulfils every request; the
tests shape capacity errors with botocore hooks), SSH (simulated instances have no
sshd: ``exec`` runs the command inside the simulated instance instead, see
:func:`simulated_runner`), network isolation between subnets (every loopback address
reaches every other), the NAT, and prices (moto quotes a token spot price).

It prints a timeline of the steps and the peak memory of each simulated instance
(resident set of its process tree, sampled by the simulator).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import ConfigError, PygirderError
from ..errors import RehearsalError

__all__ = [
    "JOB_MODULE",
    "RehearsalReport",
    "Step",
    "kill_service",
    "local_aws",
    "rehearse",
    "simulated_runner",
]

JOB_MODULE = "rehearsal_jobs"
JOB_SOURCE = '''\
"""The rehearsal's job: a re-entrant sum over a tree of grid calls."""

import time

import pygirder


@pygirder.fn
def tree_sum(depth: int, k: int = 0, leaf_s: float = 0.0) -> int:
    """Sum of the leaf numbers below node k; every inner node waits on four sub-calls."""
    if depth == 0:
        time.sleep(leaf_s)
        return k
    parts = pygirder.wait(*(tree_sum(depth - 1, 4 * k + i, leaf_s) for i in range(4)))
    return sum(parts)
'''
NAME = "rehearsal"
# Cheap x86 types; moto launches whatever it is asked for.
INSTANCE_TYPES = ("t3.small", "t3a.small", "m7a.large")
_ENV_KEYS = (
    "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED", "PYGIRDER_CONFIG",
)  # fmt: skip


@dataclass
class Step:
    """One line of the timeline: when it started (s after the start), how long it took."""

    name: str
    start_s: float
    seconds: float = 0.0
    detail: str = ""
    ok: bool = True


@dataclass
class RehearsalReport:
    workers: int
    steps: list[Step] = field(default_factory=list)
    peak_rss: dict[str, list[int]] = field(default_factory=dict)
    """Role -> peak resident bytes of each of its simulated instances."""
    result: Any = None
    expected: Any = None
    leftovers: dict[str, list[str]] = field(default_factory=dict)
    exec_output: dict[str, str] = field(default_factory=dict)
    fleet: str = ""
    job_args: tuple[Any, ...] = ()  # the job's call, asked again of the second fleet
    replacement_s: float | None = None
    """Elastic rehearsal: seconds from a spot notice until the replacements serve."""
    rebalance_s: dict[str, float] | None = None
    """Elastic rehearsal: seconds from a rebalance recommendation until its replacement
    serves (``serving``) and until the at-risk worker is drained and gone (``drained``)."""

    @property
    def seconds(self) -> float:
        return max((s.start_s + s.seconds for s in self.steps), default=0.0)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps) and self.result == self.expected

    def to_dict(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "fleet": self.fleet,
            "ok": self.ok,
            "seconds": round(self.seconds, 2),
            "steps": [
                {"name": s.name, "start_s": round(s.start_s, 2), "seconds": round(s.seconds, 2),
                 "detail": s.detail, "ok": s.ok}
                for s in self.steps
            ],
            "peak_rss_bytes": self.peak_rss,
            "result": self.result,
            "expected": self.expected,
            "leftovers": self.leftovers,
            "replacement_s": None if self.replacement_s is None else round(self.replacement_s, 1),
            "rebalance_s": None if self.rebalance_s is None
            else {k: round(v, 1) for k, v in self.rebalance_s.items()},
        }  # fmt: skip


class _Timeline:
    def __init__(self, report: RehearsalReport, say: Callable[[str], None]) -> None:
        self.report = report
        self.say = say
        self.t0 = time.monotonic()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Step]:
        step = Step(name, time.monotonic() - self.t0)
        self.report.steps.append(step)
        self.say(f"[{step.start_s:6.1f}s] {name} ...")
        try:
            yield step
        except BaseException as exc:
            step.ok = False
            step.detail = (step.detail + "; " if step.detail else "") + f"failed: {exc}"
            raise
        finally:
            step.seconds = time.monotonic() - self.t0 - step.start_s
            self.say(f"[{step.start_s + step.seconds:6.1f}s] {name}: {step.detail}")


# ----------------------------------------------------------------------- local AWS


@contextlib.contextmanager
def local_aws(region: str = "us-east-1") -> Iterator[str]:
    """A moto server on 127.0.0.1 (a free port) with boto3 pointed at it, in this
    process, and dummy credentials; the environment is restored on exit."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        raise PygirderError(
            "the rehearsal needs moto in server mode: pip install 'pygirder[sim]'"
        ) from exc
    import logging

    logging.getLogger("werkzeug").setLevel(logging.CRITICAL)  # moto logs every 4xx and 501
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    wsgi = getattr(server, "_server", None)
    if wsgi is not None:  # a client that gave up (a timeout under load) is not news
        wsgi.handle_error = _quiet_handle_error
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {key: os.environ.get(key) for key in _ENV_KEYS}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
        AWS_SESSION_TOKEN="testing", AWS_DEFAULT_REGION=region, AWS_REGION=region,
        AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
    )  # fmt: skip
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("PYGIRDER_CONFIG", None)
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def _quiet_handle_error(request: Any, client_address: Any) -> None:
    """socketserver prints a traceback for every dropped connection; log it instead."""
    import logging

    exc = sys.exc_info()[1]
    if not isinstance(exc, ConnectionError):
        logging.getLogger("pygirder.rehearse").warning(
            "local AWS: request from %s failed: %r", client_address, exc
        )


def _config(state: Path) -> Any:
    """The rehearsal's ``[cloud]`` settings, with a throwaway SSH key of its own."""
    from ..config import config_from_dict

    key = state / "id_ed25519"
    if not key.exists():
        if shutil.which("ssh-keygen"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pygirder-rehearsal",
                 "-f", str(key)],
                check=True, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        else:  # a well-formed public key whose private half nobody has
            key.with_suffix(".pub").write_text(
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDrZ2/fj2i2RDlxzFQE/0li3aGxvKT7OXirOAyehzMF4 "
                "pygirder-rehearsal\n"
            )
    from .simulator import loopback_network

    return config_from_dict(
        {
            "name": NAME,
            **loopback_network(),
            "ssh_from": "127.0.0.1/32",
            "public_key_file": str(key.with_suffix(".pub")),
            "cluster_key_file": str(state / "cluster.pem"),
        },
        base_dir=state,
    )


# ------------------------------------------------------------------ the data plane


def _processes(root: int) -> list[tuple[int, str]]:
    """(pid, command line) of every descendant of ``root``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path("/proc", entry, "stat").read_text()
                children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError):
            cmd = Path("/proc", str(pid), "cmdline").read_bytes().replace(b"\0", b" ").decode()
            out.append((pid, cmd.strip()))
        todo.extend(children.get(pid, []))
    return out


def kill_service(init_pid: int, role: str, sig: int = signal.SIGKILL) -> list[int]:
    """Signal the role's service process (``python -m pygirder <role>``) of one
    simulated instance, as a crash would; returns the pids signalled."""
    command = {"redis": "server"}.get(role, role)
    hit = [pid for pid, cmd in _processes(init_pid) if f"-m pygirder {command}" in cmd]
    for pid in hit:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return hit


def simulated_runner(source: Any) -> Callable[..., Any]:
    """An ``exec`` runner for simulated instances (see ``fleet.exec_role``).

    A simulated instance has no sshd; what SSH gives on EC2 (a shell as the service
    user, in its home, with the instance's environment) is here a new process run
    with the environment of the instance's init (read from /proc), in the instance's
    HOME.  ``source`` is a running :class:`Simulator` or the state directory of a
    ``pygirder cloud simulate`` (its ``instances.json``).
    """
    from ..fleet import ExecResult

    def lookup(instance_id: str) -> tuple[int | None, Path] | None:
        if hasattr(source, "instances"):
            found = [i for i in source.instances() if i.instance_id == instance_id]
            return (found[0].pid, found[0].home) if found else None
        data = json.loads((Path(source).expanduser() / "instances.json").read_text())
        found = [i for i in data["instances"] if i["instance_id"] == instance_id]
        return (found[0]["pid"], Path(found[0]["home"])) if found else None

    def run(row: Any, argv: Sequence[str], timeout: float) -> Any:
        started = time.monotonic()
        where = lookup(row.instance_id)
        if where is None or where[0] is None:
            return ExecResult(row.instance_id, row.role, row.address, 255, "",
                              "not a running simulated instance", 0.0)  # fmt: skip
        pid, home = where
        try:
            raw = Path("/proc", str(pid), "environ").read_bytes()
            env = dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
        except OSError as exc:
            return ExecResult(row.instance_id, row.role, row.address, 255, "", str(exc), 0.0)
        try:
            proc = subprocess.run(
                ["/bin/bash", "-c", " ".join(argv)], cwd=home, env=env, capture_output=True,
                text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            code, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired:
            code, out, err = 124, "", f"timed out after {timeout}s"
        return ExecResult(row.instance_id, row.role, row.address, code, out, err,
                          time.monotonic() - started)  # fmt: skip

    return run


# -------------------------------------------------------------------- the rehearsal


def _image(config: Any, aws: Any, step: Step) -> str | None:
    """The image command's AMI, baked on a simulated builder like on EC2; and one of the
    redis node's architecture when that is another (Graviton by default)."""
    from ..fleet.sources import type_architectures
    from ..image import build_image

    ami = build_image(config, aws=aws).image_id
    step.detail = f"built {ami}"
    redis_arch = type_architectures(aws, [config.redis_instance_type])[config.redis_instance_type]
    if redis_arch != "x86_64":
        other = build_image(config, aws=aws, architecture=redis_arch).image_id
        step.detail += f" and {other} ({redis_arch}, for the redis node)"
    return ami


def rehearse(
    workers: int = 4,
    *,
    state_dir: str | os.PathLike[str] | None = None,
    distributors: int = 1,
    job_seconds: float = 8.0,
    deadline_s: float | None = None,
    say: Callable[[str], None] | None = None,
    on_ready: Callable[[RehearsalReport, Any], None] | None = None,
    elastic: bool = False,
) -> RehearsalReport:
    """Run the whole flow once (see the module docstring) and return its timeline.

    ``elastic`` adds the fleet controller's steps (:func:`_elastic`): two workers
    reclaimed mid-job and replaced, a rebalance recommendation to one (replaced, then
    drained), the fleet grown by 4 and shrunk to 3 while the job runs, scaled to zero
    when idle and back when a new job comes.

    ``job_seconds`` sizes the job: about that long on the ready workers.  ``up`` may
    take ``deadline_s`` (default: 5 minutes, plus 8 s per worker beyond 30: booting
    is CPU-bound on a small machine).  A failing
    step raises :class:`RehearsalError` after the fleet and the account were removed.
    """
    if workers < 2:
        raise ConfigError(
            f"--workers {workers}: the rehearsal reclaims one worker while the job runs (a "
            "spot notice) to show that the job survives it, so it needs at least 2 workers; "
            "give --workers 2 or more"
        )
    say = say or (lambda text: None)
    report = RehearsalReport(workers=workers)
    timeline = _Timeline(report, say)
    owned_tmp = None
    if state_dir is None:
        owned_tmp = tempfile.TemporaryDirectory(prefix="pygirder-rehearsal-")
        state_dir = owned_tmp.name
    state = Path(state_dir).expanduser().absolute()
    state.mkdir(parents=True, exist_ok=True)
    if deadline_s is None:
        deadline_s = 300.0 + 8.0 * max(0, workers - 30)
    try:
        with contextlib.ExitStack() as stack:
            with timeline.step("local AWS") as step:
                endpoint = stack.enter_context(local_aws())
                step.detail = f"moto server at {endpoint} (in this process)"
            _rehearse(report, timeline, state, endpoint, workers, distributors, job_seconds,
                      deadline_s, on_ready, elastic)  # fmt: skip
    except PygirderError as exc:
        raise RehearsalError(str(exc), report) from exc
    finally:
        if owned_tmp is not None:
            with contextlib.suppress(OSError):
                owned_tmp.cleanup()
    return report


def _rehearse(
    report: RehearsalReport,
    timeline: _Timeline,
    state: Path,
    endpoint: str,
    workers: int,
    distributors: int,
    job_seconds: float,
    deadline_s: float,
    on_ready: Callable[[RehearsalReport, Any], None] | None,
    elastic: bool = False,
) -> None:
    from ..account import account_resources, setup, teardown
    from ..artifacts import build_artifact, push_artifact
    from ..aws import Aws
    from ..fleet import UpOptions, down, exec_role, fleet_leftovers, grid_url, up
    from .simulator import Simulator

    config = _config(state)
    aws = Aws(config)
    simulator = Simulator(
        endpoint, state / "simulate", config.region, name=config.name, poll_interval=0.5,
        stop_grace=5.0, env={"PYGIRDER_CONTROLLER_INTERVAL_S": "2"},
    )  # fmt: skip
    try:
        with timeline.step("setup") as step:
            done = setup(config, aws=aws)
            step.detail = f"{len(done.changes)} account resources created"
        with timeline.step("data plane") as step:
            simulator.start()
            step.detail = f"simulator polling {endpoint}, state in {simulator.state_dir}"
        try:
            with timeline.step("image") as step:
                image = _image(config, aws, step)
                if image is None:
                    got = aws.call("ec2", "describe_images", Owners=["amazon"])
                    image = sorted(i["ImageId"] for i in got["Images"])[0]
            with timeline.step("artifact push") as step:
                project = state / "project"
                project.mkdir(exist_ok=True)
                (project / f"{JOB_MODULE}.py").write_text(JOB_SOURCE)
                res = account_resources(config, aws=aws)
                artifact = build_artifact(project, state / "build")
                uri = push_artifact(artifact, res["bucket"], res["artifact_prefix"])
                step.detail = f"{uri} ({artifact.path.stat().st_size / 1e3:.0f} kB)"
            with timeline.step("up") as step:
                ups: list[str] = []
                summary = up(
                    config,
                    UpOptions(
                        workers=workers, distributors=distributors, instance_types=INSTANCE_TYPES,
                        image_id=image, processes="1", deadline_s=deadline_s, ttl_s=3600,
                        min_workers=workers, spot_interval_s=1.0, backoff_s=(0.5, 5.0),
                        controller=elastic,
                    ),
                    aws=aws, say=ups.append,
                )  # fmt: skip
                report.fleet = summary.fleet
                counts = ", ".join(f"{summary.ready(r)} {r}" for r in summary.requested)
                step.detail = f"fleet {summary.fleet}: {counts} ready"
            if on_ready is not None:
                on_ready(report, simulator)
            with timeline.step("job") as step:
                _job(report, config, aws, simulator, summary, job_seconds, step, grid_url)
            with timeline.step("exec") as step:
                results = exec_role(
                    config, "worker", ["tail", "-n", "1", "pygirder/boot.log"], aws=aws,
                    runner=simulated_runner(simulator), timeout=30,
                )  # fmt: skip
                report.exec_output = {r.instance_id: r.stdout.strip() for r in results}
                ok = sum(1 for r in results if r.returncode == 0)
                step.detail = f"`tail -n 1 pygirder/boot.log` on {len(results)} workers: {ok} ok"
            if elastic:
                _elastic(report, timeline, config, aws, simulator, summary, job_seconds,
                         deadline_s)  # fmt: skip
        finally:
            for inst in simulator.instances():
                role = inst.tags.get("pygirder:role") or inst.tags.get("pygirder:component", "?")
                if inst.peak_rss_bytes:
                    report.peak_rss.setdefault(role, []).append(inst.peak_rss_bytes)
            with timeline.step("down") as step:
                done_down = down(config, all_fleets=True, aws=aws, wait_interval=0.5)
                removed = sum(len(v) for v in done_down.removed.values())
                step.detail = f"removed {removed} resources; NAT {done_down.nat}"
                if done_down.failures:
                    raise PygirderError("; ".join(done_down.failures))
            with timeline.step("proof") as step:
                if report.fleet:
                    report.leftovers = fleet_leftovers(config, report.fleet, aws=aws)
                left = {k: v for k, v in report.leftovers.items() if v}
                step.detail = (
                    "nothing of the fleet is left: 0 " + ", 0 ".join(report.leftovers)
                    if not left
                    else f"LEFT: {left}"
                )
                step.ok = not left
        _second_fleet(report, timeline, config, aws, image, distributors, deadline_s)
    finally:
        with timeline.step("data plane stop") as step:
            simulator.stop()
            alive = [i.instance_id for i in simulator.instances() if i.pid is not None]
            step.detail = f"{len(simulator.instances())} simulated instances, {len(alive)} alive"
            step.ok = not alive
        with timeline.step("teardown") as step:
            torn = teardown(config, aws=aws, force=True)
            step.detail = (
                f"{len(torn.items)} account resources deleted; verified: nothing tagged "
                f"pygirder:name={config.name} is left"
                if not torn.remaining
                else f"STILL TAGGED: {torn.remaining}"
            )
            step.ok = not torn.remaining


def _second_fleet(
    report: RehearsalReport,
    timeline: _Timeline,
    config: Any,
    aws: Any,
    image: str,
    distributors: int,
    deadline_s: float,
) -> None:
    """A fleet brought up after the first one is gone asks for the same job: its workers
    find the results in the setup's S3 store (``results/``) and execute nothing."""
    import pygirder

    from ..fleet import UpOptions, down, fleet_leftovers, grid_url, up

    jobs = importlib.import_module(JOB_MODULE)
    with timeline.step("second fleet up") as step:
        summary = up(
            config,
            UpOptions(
                workers=1, distributors=distributors, instance_types=INSTANCE_TYPES,
                image_id=image, processes="1", deadline_s=deadline_s, ttl_s=3600,
                min_workers=1, spot_interval_s=1.0, backoff_s=(0.5, 5.0),
            ),
            aws=aws,
        )  # fmt: skip
        counts = ", ".join(f"{summary.ready(r)} {r}" for r in summary.requested)
        step.detail = f"fleet {summary.fleet}: {counts} ready"
    try:
        with timeline.step("job from the store") as step:
            started = time.monotonic()
            with grid_url(config, summary.fleet, aws=aws) as url, pygirder.connect(url) as grid:
                result = grid.run(jobs.tree_sum(*report.job_args), timeout=120)
                stats = grid.stats()
            restored, executed = stats.get("restored", 0), stats.get("executed", 0)
            step.detail = (
                f"tree_sum = {result} in {time.monotonic() - started:.1f}s: {restored} "
                f"restored from the first fleet's results in S3 (results/), {executed} executed"
            )
            step.ok = result == report.expected and restored >= 1 and executed == 0
    finally:
        with timeline.step("second down") as step:
            done_down = down(config, all_fleets=True, aws=aws, wait_interval=0.5)
            left = {k: v for k, v in fleet_leftovers(config, summary.fleet, aws=aws).items() if v}
            step.detail = "nothing of the second fleet is left" if not left else f"LEFT: {left}"
            step.ok = not left and not done_down.failures


def _job(
    report: RehearsalReport,
    config: Any,
    aws: Any,
    simulator: Any,
    summary: Any,
    job_seconds: float,
    step: Step,
    grid_url: Any,
) -> None:
    """A re-entrant job through the fleet; one worker gets a spot notice mid-job."""
    import pygirder

    project = str(Path(simulator.state_dir).parent / "project")
    if project not in sys.path:
        sys.path.insert(0, project)
    jobs = importlib.import_module(JOB_MODULE)
    depth = 4
    leaves = 4**depth
    workers = [m for m in summary.members if m.role == "worker"]
    leaf_s = round(job_seconds * len(workers) / leaves, 4)
    report.expected = leaves * (leaves - 1) // 2
    report.job_args = (depth, 0, leaf_s)
    with grid_url(config, summary.fleet, aws=aws) as url, pygirder.connect(url) as grid:
        started = time.monotonic()
        future = grid.submit(jobs.tree_sum(depth, 0, leaf_s))
        time.sleep(min(2.0, job_seconds / 4))
        victim = workers[0].instance_id
        running = not future.done()
        simulator.interrupt(victim, in_seconds=5.0)
        report.result = future.result(timeout=max(120.0, 10 * job_seconds))
        took = time.monotonic() - started
    host = url.rsplit("@", 1)[-1].split("/", 1)[0]
    verdict = "correct" if report.result == report.expected else f"WRONG: {report.expected}"
    step.detail = (
        f"tree_sum(depth={depth}, {leaves} leaves of {leaf_s * 1000:.0f} ms) = {report.result} "
        f"({verdict}) "
        f"in {took:.1f}s via {host} (direct); spot notice to worker {victim} "
        f"{'while the job ran' if running else 'after the job finished'}"
    )
    if report.result != report.expected:
        step.ok = False


def _live_workers(aws: Any, config: Any, fleet: str) -> set[str]:
    from ..fleet.naming import instances_of
    from ..tags import TAG_ROLE, from_tag_list

    return {
        i["InstanceId"] for i in instances_of(aws, config.name, fleet, ("pending", "running"))
        if from_tag_list(i.get("Tags")).get(TAG_ROLE) == "worker"
    }  # fmt: skip


def _until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.5)
    raise PygirderError(f"{what} did not happen within {timeout:.0f}s")


def _alive_workers(client: Any) -> int:
    from ..fleet.controller import grid_demand

    return grid_demand(client)["alive"]


def _rebalance(
    report: RehearsalReport,
    step: Step,
    aws: Any,
    config: Any,
    fleet: str,
    simulator: Any,
    client: Any,
    size: int,
    wait_s: float,
) -> None:
    """A rebalance recommendation to one worker: its replacement serves before the
    at-risk worker is drained (its calls handed back) and terminated."""
    from ..fleet.controller import status_key
    from ..instance.drain import drained_key

    before = _live_workers(aws, config, fleet)
    victim = sorted(before)[0]
    started = time.monotonic()
    simulator.recommend_rebalance(victim)
    ended: dict[str, str] = {}
    times: dict[str, float] = {}

    def watch() -> bool:
        live = _live_workers(aws, config, fleet)
        status = json.loads(client.get(status_key(fleet)) or "{}")
        if victim in status.get("drained", {}):
            ended[victim] = status["drained"][victim]
        elif client.hexists(drained_key(fleet), victim):  # its agent confirmed the drain
            ended[victim] = "drained"
        if "launched" not in times and live - before:
            times["launched"] = time.monotonic() - started
        # The replacement's worker has registered while the at-risk one still serves.
        if ("launched" in times and "serving" not in times and victim in live
                and _alive_workers(client) > size):  # fmt: skip
            times["serving"] = time.monotonic() - started
        if victim not in live:
            times.setdefault("drained", time.monotonic() - started)
        return "drained" in times and _alive_workers(client) >= size and len(live) == size

    _until(watch, wait_s, "the at-risk worker's replacement and drain")
    report.rebalance_s = {k: times[k] for k in ("serving", "drained") if k in times}
    new = ", ".join(sorted(_live_workers(aws, config, fleet) - before))
    # The status and the drain record last a round or so: a drain may end unseen.
    timed_out = ended.get(victim) == "drain timed out"
    step.ok = "serving" in times and not timed_out
    how = "drain timed out, terminated" if timed_out else "drained and terminated"
    step.detail = (
        f"rebalance recommendation to {victim}; replacement {new} launched "
        f"{times.get('launched', float('nan')):.1f}s after it, serving after "
        f"{times.get('serving', float('nan')):.1f}s; {victim} {how} after "
        f"{times['drained']:.1f}s"
    )


def _elastic(
    report: RehearsalReport,
    timeline: _Timeline,
    config: Any,
    aws: Any,
    simulator: Any,
    summary: Any,
    job_seconds: float,
    wait_s: float,
) -> None:
    """The controller's steps: reclaim and replace, replace and drain one at risk, grow
    and shrink mid-job, zero and back."""
    import redis

    import pygirder

    from ..fleet import grid_url
    from ..fleet.converge import Target, converge

    jobs = importlib.import_module(JOB_MODULE)
    fleet = summary.fleet
    size = summary.ready("worker")
    grow_to, shrink_to = size + 4, min(3, size)
    depth, leaves = 4, 4**4
    # Long enough (about 12 x job_seconds on the first workers) to resize under it.
    leaf_s = round(12 * job_seconds * size / leaves, 4)

    def expected(k: int) -> int:  # the leaves below node k are k*L .. (k+1)*L - 1
        return sum(range(k * leaves, (k + 1) * leaves))

    def resize(step: Step, **sizes: Any) -> None:
        target = Target(instance_types=INSTANCE_TYPES, distributors=summary.ready("distributor"),
                        **sizes)  # fmt: skip
        done = converge(config, fleet, target, aws=aws, deadline_s=wait_s)
        if done.problems:
            raise PygirderError("; ".join(done.problems))
        step.detail = ", ".join(f"{s.live} {s.role}" for s in done.sizes) + " live"

    with grid_url(config, fleet, aws=aws) as url, pygirder.connect(url) as grid:
        client = redis.Redis.from_url(url)
        stack_ok = risk_ok = True
        with timeline.step("reclaim 2, replace") as step:
            future = grid.submit(jobs.tree_sum(depth, 1, leaf_s))
            before = _live_workers(aws, config, fleet)
            victims = sorted(before)[:2]
            started = time.monotonic()
            for victim in victims:
                simulator.interrupt(victim, in_seconds=5.0)
            new = _until(lambda: (_live_workers(aws, config, fleet) - before) or None, wait_s,
                         "a replacement launch")  # fmt: skip
            launched_s = time.monotonic() - started

            def serving() -> bool:
                live = _live_workers(aws, config, fleet)
                return not set(victims) & live and len(live) == size

            _until(lambda: serving() and _alive_workers(client) >= size, wait_s,
                   "the replacements serving")  # fmt: skip
            report.replacement_s = time.monotonic() - started
            step.detail = (
                f"spot notices to {', '.join(victims)}; first replacement launched "
                f"{launched_s:.1f}s after the notice ({', '.join(sorted(new))}), {size} workers "
                f"serving again {report.replacement_s:.1f}s after it"
            )
        with timeline.step(f"grow to {grow_to}") as step:
            resize(step, workers=grow_to)
            _until(lambda: _alive_workers(client) >= grow_to, wait_s, "the new workers serving")
        with timeline.step(f"shrink to {shrink_to}") as step:
            running = not future.done()
            resize(step, workers=shrink_to)
            step.detail += f"; drained {'while the job ran' if running else 'after the job'}"
        with timeline.step("elastic job") as step:
            try:
                got = future.result(timeout=wait_s + 40 * job_seconds)
            except concurrent.futures.TimeoutError:
                raise PygirderError(
                    f"the elastic job did not finish within {wait_s + 40 * job_seconds:.0f}s"
                ) from None
            stack_ok = got == expected(1)
            step.detail = (
                f"tree_sum(depth={depth}, k=1) = {got} ({'correct' if stack_ok else 'WRONG'})"
            )
            step.ok = stack_ok
        with timeline.step("rebalance 1") as step:
            # A job of its own (about 50 s on the workers) runs while one is replaced.
            job = grid.submit(
                jobs.tree_sum(depth, 3, round(9 * job_seconds * shrink_to / leaves, 4))
            )
            _rebalance(report, step, aws, config, fleet, simulator, client, shrink_to, wait_s)
            running = not job.done()
            try:
                got = job.result(timeout=wait_s + 40 * job_seconds)
            except concurrent.futures.TimeoutError:
                raise PygirderError("the rebalance step's job did not finish in time") from None
            risk_ok = got == expected(3)
            step.detail += (
                f"; tree_sum(depth={depth}, k=3) = {got} ({'correct' if risk_ok else 'WRONG'}), "
                f"{'drained while it ran' if running else 'it finished before the drain'}"
            )
            step.ok = step.ok and risk_ok
        with timeline.step("idle to zero") as step:
            resize(step, workers=shrink_to, min_workers=0, max_workers=shrink_to, idle_s=3.0)
            _until(lambda: not _live_workers(aws, config, fleet), wait_s, "scaling to zero")
            step.detail = "0 workers after 3 s idle; the redis node and distributors stay"
        with timeline.step("wake on work") as step:
            # Short leaves: the step shows a worker coming back, not one working for long.
            got = grid.run(jobs.tree_sum(depth, 2, leaf_s / 64), timeout=wait_s)
            ok = got == expected(2)
            step.detail = (f"a new job brought {len(_live_workers(aws, config, fleet))} "
                           f"worker(s) back; tree_sum(depth={depth}, k=2) = {got} "
                           f"({'correct' if ok else 'WRONG'})")  # fmt: skip
            step.ok = ok
        client.close()
    if not (stack_ok and ok and risk_ok):
        report.result = None  # the report is not ok
