"""The local data plane: each pygirder instance of a local AWS endpoint runs as a process tree.

A :class:`Simulator` watches an endpoint (moto in server mode) for running instances
tagged ``pygirder:managed=true`` and gives each one what a real instance has:

- **a private address** on the loopback network, stable across stop and start: the
  one EC2 gave it when the VPC lies inside 127.0.0.0/8 (as a rehearsal's does, so
  DescribeInstances tells the truth), else ``127.X.Y.n`` of the simulator's own
  block; Linux routes all of 127.0.0.0/8 to ``lo``, so a service binding its
  "private IP" works as on EC2;
- **its own IMDSv2** (:class:`~pygirder.cloud.sim.imds.ImdsEmulator`) with its instance id,
  address, zone, type, life cycle (spot or on-demand), tags (when the launch enabled
  tags in metadata) and the user-data it was launched with (read back with
  DescribeInstanceAttribute, which moto fills for RunInstances and for launch-template
  launches such as EC2 Fleet ``instant``);
- **a boot**: the image's very boot robot (``pygirder-boot.sh``) runs under a small
  init process (:mod:`pygirder.cloud.sim.siminit`), in the instance's own HOME under the
  state directory, fetches the user-data through IMDSv2 and runs it.  The init is a
  child subreaper, so every process the user-data starts (even one that starts its
  own session) stays in the instance's tree.

The instance's environment is minimal and holds the documented seams of a simulated
instance: ``PYGIRDER_IMDS_ENDPOINT`` / ``AWS_EC2_METADATA_SERVICE_ENDPOINT`` (its
emulator), ``AWS_ENDPOINT_URL`` (the endpoint), dummy credentials (a real instance gets
them from its instance role), ``PYGIRDER_PYTHON`` (the interpreter that stands in for
the image's ``/opt/pygirder/bin/python3``), ``PYGIRDER_SHUTDOWN_COMMAND`` (a command
that shuts the instance down through the EC2 API, honouring its
InstanceInitiatedShutdownBehavior, so a time-to-live ends it as on EC2) and
``PYGIRDER_SIMULATED=1`` (the bake script's signal to check instead of install).
Processes run as the current user.

When EC2 stops or terminates an instance, its process tree gets SIGTERM (all of it at
once, as systemd's ``KillMode=control-group`` does) and SIGKILL after a grace period.
A stopped instance boots again when it is started, and when the simulator dies
its instances end too.  :meth:`Simulator.interrupt`
posts a spot interruption notice and, when it falls due, reclaims the instance
through the API; ``pygirder cloud simulate interrupt ID`` asks a running simulator
to do the same through a control file in its state directory.

Each instance's peak resident memory (the sum over its process tree, sampled every
poll) is kept for memory reports.  Layout of the state directory::

    simulator.lock             held while a simulator runs (one per directory)
    instances.json             every instance's state, rewritten on change
    control/                   requests from `pygirder cloud simulate interrupt`
    pygirder-boot              the boot robot
    instances/<id>/home/       the instance's HOME (kept after termination)
    instances/<id>/console.log the boot robot's output (the systemd journal's part)
"""

from __future__ import annotations

import base64
import contextlib
import enum
import ipaddress
import json
import logging
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SimulatorError, SimulatorTimeout
from ..instance import boot_robot
from ..tags import MANAGED_VALUE, TAG_MANAGED, TAG_NAME, from_tag_list
from .control import (
    DEFAULT_STATE_DIR,
    lock_state_dir,
    request_interrupt,
    serve_requests,
    write_atomic,
)
from .imds import ImdsEmulator
from .proctree import children_map, kill_tree, tree_rss

__all__ = [
    "DEFAULT_STATE_DIR",
    "SIMULATED_ENV",
    "SimInstance",
    "SimState",
    "Simulator",
    "SimulatorError",
    "SimulatorTimeout",
    "request_interrupt",
]

log = logging.getLogger("pygirder.simulate")

# Set to "1" in every simulated instance: the one signal that it is not on EC2.
SIMULATED_ENV = "PYGIRDER_SIMULATED"
POLL_INTERVAL_S = 0.5
# SIGTERM to SIGKILL when an instance stops; systemd waits 90 s, a simulation need not.
STOP_GRACE_S = 10.0
# Instances get credentials from their role on EC2; here, dummies the endpoint accepts.
DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
}


class SimState(enum.StrEnum):
    """What a simulated instance is doing, as the simulator sees it."""

    PENDING = "pending"  # seen running on EC2, about to boot
    RUNNING = "running"  # its process tree (boot robot, user-data, services) is alive
    EXITED = "exited"  # its user-data finished and no process is left; EC2 still says running
    STOPPING = "stopping"  # EC2 stopped or terminated it; its processes are being signalled
    STOPPED = "stopped"  # stopped on EC2 (or the simulator stopped): no process is left
    TERMINATED = "terminated"  # terminated (or gone from the endpoint) and no process is left


@dataclass(frozen=True)
class SimInstance:
    """A snapshot of one simulated instance (see :meth:`Simulator.instances`)."""

    instance_id: str
    state: SimState
    ec2_state: str
    private_ip: str
    zone: str
    instance_type: str
    lifecycle: str
    tags: dict[str, str]
    home: Path
    console_log: Path
    imds_url: str | None
    pid: int | None
    exit_status: int | None
    boots: int
    peak_rss_bytes: int | None
    spot_action: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(state=str(self.state), home=str(self.home), console_log=str(self.console_log))
        return data

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the boot robot's output and of the user-data's boot log."""
        parts = []
        for path in (self.console_log, self.home / "pygirder" / "boot.log"):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(parts)


# -- one instance ---------------------------------------------------------------------------
@dataclass
class _Machine:
    instance_id: str
    private_ip: str
    directory: Path
    zone: str
    instance_type: str
    lifecycle: str
    tags: dict[str, str]
    ec2_state: str
    state: SimState = SimState.PENDING
    emulator: ImdsEmulator | None = None
    proc: subprocess.Popen[bytes] | None = None
    exit_status: int | None = None
    boots: int = 0
    peak_rss: int | None = None
    reclaim: tuple[float, str] | None = None
    spot_action: dict[str, str] | None = None
    halting: threading.Thread | None = field(default=None, repr=False)

    @property
    def home(self) -> Path:
        return self.directory / "home"

    @property
    def console_log(self) -> Path:
        return self.directory / "console.log"

    @property
    def imds_url(self) -> str | None:
        try:
            return self.emulator.url if self.emulator is not None else None
        except RuntimeError:  # stopped
            return None

    def snapshot(self) -> SimInstance:
        running = self.proc is not None and self.proc.returncode is None
        return SimInstance(
            instance_id=self.instance_id,
            state=self.state,
            ec2_state=self.ec2_state,
            private_ip=self.private_ip,
            zone=self.zone,
            instance_type=self.instance_type,
            lifecycle=self.lifecycle,
            tags=dict(self.tags),
            home=self.home,
            console_log=self.console_log,
            imds_url=self.imds_url,
            pid=self.proc.pid if running and self.proc else None,
            exit_status=self.exit_status,
            boots=self.boots,
            peak_rss_bytes=self.peak_rss,
            spot_action=dict(self.spot_action) if self.spot_action else None,
        )


class Simulator:
    """Runs the pygirder instances of ``endpoint`` as local process trees.

    ``start()`` checks the endpoint, then polls DescribeInstances every
    ``poll_interval`` seconds in a background thread; ``stop()`` ends every process
    tree (EC2 states are left as they are).  Also a context manager.  Only instances
    tagged ``pygirder:managed=true`` are run, and with ``name`` only those of that
    setup (``pygirder:name``).  ``env`` adds variables to every instance's
    environment; ``python`` is the interpreter given as ``PYGIRDER_PYTHON``.
    ``on_event(instance, message)`` hears about boots, exits, stops and interruptions.
    """

    def __init__(
        self,
        endpoint: str,
        state_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR,
        region: str = "us-east-1",
        *,
        name: str | None = None,
        poll_interval: float = POLL_INTERVAL_S,
        stop_grace: float = STOP_GRACE_S,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
        credentials: Mapping[str, str] | None = None,
        address_block: str | None = None,
        on_event: Callable[[SimInstance, str], None] | None = None,
    ) -> None:
        if ".amazonaws.com" in endpoint or not endpoint.startswith(("http://", "https://")):
            raise SimulatorError(
                f"refusing to simulate {endpoint!r}: give the URL of a local AWS-compatible "
                "endpoint such as moto_server (http://127.0.0.1:5000), never AWS itself"
            )
        self.endpoint = endpoint.rstrip("/")
        self.state_dir = Path(state_dir).expanduser().absolute()
        self.region = region
        self.name = name
        self.poll_interval = poll_interval
        self.stop_grace = stop_grace
        self.python = python
        self.env = dict(env or {})
        self.credentials = dict(credentials or DUMMY_CREDENTIALS)
        self.on_event = on_event
        self._network = _address_block(address_block)
        self._next_host = 10
        self._machines: dict[str, _Machine] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_file: Any = None
        self._ec2: Any = None
        self._robot: Path | None = None
        self._last_status = ""
        self.last_error: str | None = None

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> Simulator:
        """Check the host and the endpoint, run one poll, then keep polling in a thread."""
        if self._thread is not None:
            return self
        for tool in ("bash", "curl"):
            if shutil.which(tool) is None:
                raise SimulatorError(
                    f"the data plane runs the image's boot robot, which needs {tool}: install it"
                )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "control").mkdir(exist_ok=True)
        (self.state_dir / "instances").mkdir(exist_ok=True)
        self._lock_file = lock_state_dir(self.state_dir)
        try:
            self._check_loopback()
            self._robot = self.state_dir / "pygirder-boot"
            self._robot.write_bytes(boot_robot())
            self._robot.chmod(0o755)
            self._ec2 = self._client()
            self._tick(first=True)
        except BaseException:
            for machine in list(self._machines.values()):
                self._halt_async(machine, None)
            self._release()
            raise
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="pygirder-simulator", daemon=True)
        self._thread.start()
        log.info("simulating the instances of %s (state in %s)", self.endpoint, self.state_dir)
        return self

    def stop(self) -> None:
        """End every instance's process tree and stop polling; EC2 is left as it is."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        with self._cond:
            machines = list(self._machines.values())
        for machine in machines:
            self._halt_async(machine, SimState.STOPPED)
        for machine in machines:
            if machine.halting is not None:
                machine.halting.join(self.stop_grace + 15)
            if machine.emulator is not None:
                machine.emulator.stop()
        self._write_status()
        self._release()

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _release(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # -- queries ----------------------------------------------------------------------
    def instances(self) -> list[SimInstance]:
        """Every instance seen so far (terminated ones included), oldest first."""
        with self._cond:
            return [m.snapshot() for m in self._machines.values()]

    def instance(self, instance_id: str) -> SimInstance:
        with self._cond:
            machine = self._machines.get(instance_id)
            if machine is None:
                raise SimulatorError(
                    f"instance {instance_id} is not simulated: it is unknown, not running, "
                    f"or not tagged {TAG_MANAGED}={MANAGED_VALUE}"
                    + (f" and {TAG_NAME}={self.name}" if self.name else "")
                )
            return machine.snapshot()

    def wait_for(
        self, instance_id: str, state: SimState | str, timeout: float = 60.0
    ) -> SimInstance:
        """Wait until the instance is in ``state``; returns it, or raises with its logs.

        The instance need not be known yet: waiting for a just-launched one is fine.
        """
        wanted = SimState(state)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                machine = self._machines.get(instance_id)
                if machine is not None and machine.state is wanted:
                    return machine.snapshot()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 1.0))
        if machine is None:
            raise SimulatorTimeout(
                f"instance {instance_id} was never seen running within {timeout:g}s "
                f"(last poll error: {self.last_error or 'none'})"
            )
        seen = machine.snapshot()
        raise SimulatorTimeout(
            f"instance {instance_id} is {seen.state} (EC2: {seen.ec2_state}), not {wanted}, "
            f"after {timeout:g}s\n{seen.log_tail()}"
        )

    # -- events -----------------------------------------------------------------------
    def interrupt(
        self,
        instance_id: str,
        *,
        action: str = "terminate",
        in_seconds: float = 120.0,
        reclaim: bool = True,
    ) -> str:
        """Post a spot interruption notice; returns its time (ISO, UTC).

        The notice appears at ``spot/instance-action`` of the instance's IMDS at once.
        With ``reclaim`` the simulator then does what AWS does ``in_seconds`` later:
        terminates or stops the instance through the EC2 API (a hibernation is a stop).
        """
        if action not in ("terminate", "stop", "hibernate"):
            raise SimulatorError(f"action must be terminate, stop or hibernate, not {action!r}")
        with self._cond:
            machine = self._running_spot(instance_id, "interrupts")
            assert machine.emulator is not None
            stamp = machine.emulator.raise_spot_interruption(action, in_seconds)
            machine.spot_action = {"action": action, "time": stamp}
            if reclaim:
                machine.reclaim = (time.monotonic() + in_seconds, action)
            snapshot = machine.snapshot()
        self._event(snapshot, f"spot interruption notice: {action} at {stamp}")
        return stamp

    def recommend_rebalance(self, instance_id: str) -> str:
        """Post a rebalance recommendation at the instance's IMDS; returns its time.

        EC2's earlier, softer warning: the instance is at elevated risk of interruption
        and nothing happens to it by itself (a reclaim, if any, comes with a notice).
        """
        with self._cond:
            machine = self._running_spot(instance_id, "recommends rebalancing")
            assert machine.emulator is not None
            stamp = machine.emulator.recommend_rebalance()
            snapshot = machine.snapshot()
        self._event(snapshot, f"rebalance recommendation at {stamp}")
        return stamp

    def _running_spot(self, instance_id: str, what: str) -> _Machine:
        """The running spot machine of ``instance_id`` (with ``self._cond`` held)."""
        machine = self._machines.get(instance_id)
        if machine is None or machine.emulator is None or machine.ec2_state != "running":
            raise SimulatorError(f"instance {instance_id} is not a running simulated instance")
        if machine.lifecycle != "spot":
            raise SimulatorError(
                f"instance {instance_id} is an on-demand instance: AWS {what} only spot "
                f"instances (launch it as spot to rehearse that)"
            )
        return machine

    # -- the poll loop ------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self._tick()
            except Exception as exc:  # keep simulating; the endpoint may come back
                log.warning("simulator poll failed: %s", exc)
                self.last_error = str(exc)

    def _client(self) -> Any:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise SimulatorError("the data plane needs boto3: pip install 'pygirder[sim]'") from exc
        session = boto3.session.Session(
            aws_access_key_id=self.credentials.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=self.credentials.get("AWS_SECRET_ACCESS_KEY"),
            aws_session_token=self.credentials.get("AWS_SESSION_TOKEN"),
            region_name=self.region,
        )
        config = Config(
            retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5, read_timeout=30
        )
        return session.client("ec2", endpoint_url=self.endpoint, config=config)

    def _describe(self) -> dict[str, dict[str, Any]]:
        filters = [{"Name": f"tag:{TAG_MANAGED}", "Values": [MANAGED_VALUE]}]
        if self.name:
            filters.append({"Name": f"tag:{TAG_NAME}", "Values": [self.name]})
        found: dict[str, dict[str, Any]] = {}
        for page in self._ec2.get_paginator("describe_instances").paginate(Filters=filters):
            for reservation in page.get("Reservations", []):
                for inst in reservation.get("Instances", []):
                    found[inst["InstanceId"]] = inst
        return found

    def _tick(self, first: bool = False) -> None:
        self._serve_control_requests()
        try:
            described = self._describe()
        except Exception as exc:
            if first:
                raise SimulatorError(
                    f"cannot list instances at {self.endpoint}: {exc}. Is the endpoint "
                    "(e.g. `moto_server -H 127.0.0.1 -p 5000`) running?"
                ) from exc
            raise
        self.last_error = None
        now = time.monotonic()
        for iid, inst in described.items():
            ec2_state = inst["State"]["Name"]
            with self._cond:
                machine = self._machines.get(iid)
                if machine is None and ec2_state not in ("pending", "running"):
                    continue
                if machine is None:
                    machine = self._new_machine(inst)
                machine.ec2_state = ec2_state
                machine.tags = from_tag_list(inst.get("Tags"))
            self._converge(machine, inst)
            if machine.reclaim is not None and machine.reclaim[0] <= now:
                self._reclaim(machine)
        with self._cond:
            vanished = [m for iid, m in self._machines.items() if iid not in described]
        for machine in vanished:  # e.g. the endpoint was reset
            if machine.ec2_state != "terminated":
                machine.ec2_state = "terminated"
                self._converge(machine, None)
        self._watch_processes()
        self._write_status()

    def _new_machine(self, inst: dict[str, Any]) -> _Machine:
        iid = inst["InstanceId"]
        directory = self.state_dir / "instances" / iid
        (directory / "home").mkdir(parents=True, exist_ok=True)
        machine = _Machine(
            instance_id=iid,
            private_ip=self._address_of(inst),
            directory=directory,
            zone=inst.get("Placement", {}).get("AvailabilityZone") or f"{self.region}a",
            instance_type=inst.get("InstanceType", "t3.micro"),
            lifecycle="spot" if inst.get("InstanceLifecycle") == "spot" else "on-demand",
            tags=from_tag_list(inst.get("Tags")),
            ec2_state=inst["State"]["Name"],
        )
        self._machines[iid] = machine
        return machine

    def _converge(self, machine: _Machine, inst: dict[str, Any] | None) -> None:
        """Make the local processes match the instance's EC2 state."""
        ec2_state = machine.ec2_state
        booting = machine.state in (SimState.PENDING, SimState.STOPPED)
        if ec2_state == "running" and booting and inst is not None:
            self._boot(machine, inst)
        elif ec2_state in ("stopping", "stopped", "shutting-down", "terminated"):
            final = SimState.TERMINATED if ec2_state in ("shutting-down", "terminated") else None
            if machine.state in (SimState.RUNNING, SimState.EXITED):
                self._halt_async(machine, final or SimState.STOPPED)
            elif booting and final is SimState.TERMINATED:
                self._set_state(machine, SimState.TERMINATED, "terminated")

    def _boot(self, machine: _Machine, inst: dict[str, Any]) -> None:
        user_data = self._user_data(machine.instance_id)
        metadata_options = inst.get("MetadataOptions") or {}
        tags_in_imds = metadata_options.get("InstanceMetadataTags") == "enabled"
        public = machine.private_ip if inst.get("PublicIpAddress") else None
        if machine.emulator is None:
            machine.emulator = ImdsEmulator(
                instance_id=machine.instance_id,
                user_data=user_data,
                local_ipv4=machine.private_ip,
                public_hostname=public,
                public_ipv4=public,
                availability_zone=machine.zone,
                instance_type=machine.instance_type,
                lifecycle=machine.lifecycle,
                ami_id=inst.get("ImageId", "ami-00000000000000000"),
                tags=machine.tags if tags_in_imds else None,
            ).start()
        else:  # a reboot after a stop: same metadata, no pending notice
            machine.emulator.user_data = user_data
            machine.emulator.clear_spot_interruption()
        machine.spot_action = None
        env = self._instance_env(machine)
        assert self._robot is not None
        command = [
            sys.executable, "-I", "-S", str(Path(__file__).with_name("siminit.py")),
            "--grace", f"{self.stop_grace:g}", "--", "/bin/bash", str(self._robot),
        ]  # fmt: skip
        (machine.home / "tmp").mkdir(parents=True, exist_ok=True)
        with open(machine.console_log, "ab") as console:
            console.write(
                f"--- boot {machine.boots + 1} of {machine.instance_id} at "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode()
            )
            console.flush()
            proc = subprocess.Popen(
                command, env=env, cwd=machine.home, stdin=subprocess.DEVNULL,
                stdout=console, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        with self._cond:
            machine.proc = proc
            machine.exit_status = None
            machine.boots += 1
            machine.reclaim = None
        self._set_state(
            machine, SimState.RUNNING, f"booted as {machine.private_ip} (pid {proc.pid})"
        )

    def _user_data(self, instance_id: str) -> bytes | None:
        attr = self._ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
        value = (attr.get("UserData") or {}).get("Value")
        return base64.b64decode(value) if value else None

    def _instance_env(self, machine: _Machine) -> dict[str, str]:
        assert machine.emulator is not None
        user = os.environ.get("USER") or os.environ.get("LOGNAME") or "pygirder"
        shutdown = [
            sys.executable, "-m", "pygirder.cloud.sim.shutdown",
            machine.instance_id, "--region", self.region,
        ]  # fmt: skip
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOME": str(machine.home),
            "USER": user,
            "LOGNAME": user,
            "SHELL": "/bin/bash",
            "TMPDIR": str(machine.home / "tmp"),
            "PYTHONUNBUFFERED": "1",
            **machine.emulator.env(),
            "AWS_ENDPOINT_URL": self.endpoint,
            # The host user's AWS profiles never leak into an instance.
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            **self.credentials,
            SIMULATED_ENV: "1",
            "PYGIRDER_PYTHON": self.python,
            "PYGIRDER_SHUTDOWN_COMMAND": shlex.join(shutdown),
        }
        env.update(self.env)
        return env

    def _halt_async(self, machine: _Machine, final: SimState | None) -> None:
        """SIGTERM the instance's tree, SIGKILL after the grace period, in a thread."""
        with self._cond:
            if machine.halting is not None and machine.halting.is_alive():
                return
            proc = machine.proc
            if proc is not None and proc.poll() is None:
                machine.state = SimState.STOPPING
                self._cond.notify_all()
                machine.halting = threading.Thread(
                    target=self._halt, args=(machine, proc, final),
                    name=f"halt-{machine.instance_id}",
                )  # fmt: skip
                machine.halting.start()
                return
            machine.proc = None
        if final is not None and machine.state is not final:
            self._set_state(machine, final, str(final))

    def _halt(
        self, machine: _Machine, proc: subprocess.Popen[bytes], final: SimState | None
    ) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)  # the init forwards it to the whole tree
        try:
            proc.wait(self.stop_grace + 5)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait(10)
        with self._cond:
            machine.exit_status = proc.returncode
            machine.proc = None
        if final is not None:
            self._set_state(machine, final, f"{final} (processes ended)")

    def _watch_processes(self) -> None:
        """Notice finished user-data and sample each tree's memory."""
        with self._cond:
            machines = list(self._machines.values())
        children = children_map() if any(m.proc for m in machines) else {}
        for machine in machines:
            proc = machine.proc
            if proc is None or machine.state is not SimState.RUNNING:
                continue
            status = proc.poll()
            if status is not None:
                with self._cond:
                    machine.exit_status = status
                    machine.proc = None
                self._set_state(machine, SimState.EXITED, f"user-data exited with status {status}")
                continue
            rss = tree_rss(proc.pid, children)
            if rss is not None:
                with self._cond:
                    machine.peak_rss = max(machine.peak_rss or 0, rss)

    def _reclaim(self, machine: _Machine) -> None:
        assert machine.reclaim is not None
        action = machine.reclaim[1]
        machine.reclaim = None
        iid = machine.instance_id
        if action == "terminate":
            self._ec2.terminate_instances(InstanceIds=[iid])
        else:
            self._ec2.stop_instances(InstanceIds=[iid])
        self._event(machine.snapshot(), f"spot capacity reclaimed: {action}")

    def _set_state(self, machine: _Machine, state: SimState, message: str) -> None:
        with self._cond:
            machine.state = state
            snapshot = machine.snapshot()
            self._cond.notify_all()
        if state is SimState.TERMINATED and machine.emulator is not None:
            machine.emulator.stop()  # nobody will ask it again
        self._event(snapshot, message)

    def _event(self, instance: SimInstance, message: str) -> None:
        log.info("%s: %s", instance.instance_id, message)
        if self.on_event is not None:
            try:
                self.on_event(instance, message)
            except Exception:  # a broken listener must not stop the data plane
                log.exception("on_event failed")

    # -- addresses --------------------------------------------------------------------
    def _address_of(self, inst: dict[str, Any]) -> str:
        """The instance's EC2 private address when it can exist here (a VPC inside
        127.0.0.0/8, as a rehearsal sets up), so that what EC2 reports is where the
        instance really listens; else one of this simulator's block."""
        private = inst.get("PrivateIpAddress") or ""
        with contextlib.suppress(ValueError):
            if ipaddress.IPv4Address(private) in _LOOPBACK and private != "127.0.0.1":
                return private
        return self._allocate_address()

    def _allocate_address(self) -> str:
        hosts = self._network.num_addresses - 2
        if self._next_host > hosts:
            raise SimulatorError(
                f"no loopback address left in {self._network} for another instance"
            )
        address = str(self._network.network_address + self._next_host)
        self._next_host += 1
        return address

    def _check_loopback(self) -> None:
        address = str(self._network.network_address + self._next_host)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((address, 0))
        except OSError as exc:
            raise SimulatorError(
                f"cannot bind {address}: simulated instances need the whole 127.0.0.0/8 on "
                "the loopback interface, as Linux has it (on macOS add aliases with "
                f"`sudo ifconfig lo0 alias {address}`): {exc}"
            ) from exc

    # -- status file and control requests -------------------------------------------------
    def _write_status(self) -> None:
        with self._cond:
            data = {
                "endpoint": self.endpoint,
                "pid": os.getpid(),
                "instances": [m.snapshot().to_dict() for m in self._machines.values()],
            }
        text = json.dumps(data, indent=2, sort_keys=True)
        if text == self._last_status:
            return
        self._last_status = text
        write_atomic(self.state_dir / "instances.json", text)

    def _serve_control_requests(self) -> None:
        serve_requests(self.state_dir / "control", self.interrupt)


# -- helpers --------------------------------------------------------------------------------
_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")


def loopback_network() -> dict[str, str]:
    """``[cloud]`` network settings of a VPC inside 127.0.0.0/8 (a random /16), so
    that the addresses EC2 assigns are ones a simulated instance can bind."""
    second = random.randint(16, 254)
    return {
        "vpc_cidr": f"127.{second}.0.0/16",
        "public_subnet_cidr": f"127.{second}.0.0/20",
        "private_subnet_cidr": f"127.{second}.128.0/17",
    }


def _address_block(block: str | None) -> ipaddress.IPv4Network:
    """A /24 of 127.0.0.0/8 for this simulator's instances (random unless given).

    A random block keeps two simulators on one host (two test runs, a rehearsal)
    from handing out the same address; 127.0.0.0/24 (127.0.0.1, 127.0.0.53) is avoided.
    """
    if block is None:
        block = f"127.{random.randint(16, 254)}.{random.randint(0, 255)}.0/24"
    network = ipaddress.IPv4Network(block)
    if not network.subnet_of(ipaddress.IPv4Network("127.0.0.0/8")) or network.num_addresses < 16:
        raise SimulatorError(f"address_block {block!r} must be a /28 or larger inside 127.0.0.0/8")
    return network
