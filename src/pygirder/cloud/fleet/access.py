"""Reaching a fleet: its grid over a route and commands on its instances.

Reaching the grid is pluggable (:data:`ROUTES`): the redis node's private address
directly when it answers (a rehearsal on 127.0.0.x, or a laptop inside the VPC), else
an SSH tunnel through the redis node's public address, else an SSM port forward.
Commands on instances (``exec``) go through a pluggable :data:`Runner`: SSH on AWS;
a rehearsal passes one that runs the command inside the simulated instance.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError
from ..aws import Aws
from ..config import CloudConfig
from ..errors import FleetError, NoFleetError
from ..instance.common import DEFAULT_REDIS_PORT
from .inventory import InstanceRow, resolve_fleet, rows_of
from .naming import KNOWN_HOSTS_DIR, SSH_USER, check_fleet_id

if TYPE_CHECKING:
    from .launch import Member

# --------------------------------------------------------------- reaching the grid


@dataclass(frozen=True)
class GridNode:
    """The redis node of a fleet, as the other commands need it."""

    instance_id: str
    fleet: str
    address: str
    public_ip: str
    port: int = DEFAULT_REDIS_PORT


def redis_node(config: CloudConfig, fleet: str | None = None, *, aws: Aws) -> GridNode:
    fleet = resolve_fleet(config, fleet, aws=aws)
    nodes = [
        r for r in rows_of(aws, config.name, fleet, prices=False)
        if r.role == "redis" and r.state == "running"
    ]  # fmt: skip
    if not nodes:
        raise NoFleetError(
            f"fleet {fleet} has no running redis node: `pygirder cloud up --fleet {fleet}` "
            "launches a replacement",
            code="NoRedisNode",
        )
    node = nodes[0]
    return GridNode(node.instance_id, fleet, node.address, node.public_ip)


def redis_password(config: CloudConfig, fleet: str, *, aws: Aws) -> str:
    from ..instance.announce import redis_password_parameter

    got = aws.call(
        "ssm",
        "get_parameter",
        Name=redis_password_parameter(config.name, fleet),
        WithDecryption=True,
    )
    return str(got["Parameter"]["Value"])


def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# A route gives a local (host, port) that reaches the node's Redis, or None when it
# cannot be used from here.  It is a context manager factory: tunnels close on exit.
Route = Callable[
    [GridNode, CloudConfig, int], contextlib.AbstractContextManager[tuple[str, int]] | None
]


def direct_route(node: GridNode, config: CloudConfig, local_port: int):
    """The node's private address, when this machine can open it (same network)."""
    if not node.address or not reachable(node.address, node.port):
        return None
    return contextlib.nullcontext((node.address, node.port))


def _private_key(config: CloudConfig) -> Path | None:
    """The private half of ``public_key_file`` (the key the instances accept), if here."""
    path = config.public_key_path
    private = path.with_suffix("") if path.suffix == ".pub" else None
    return private if private is not None and private.is_file() else None


def known_hosts_path(fleet: str) -> Path:
    """The known_hosts file that pins the host keys of ``fleet``'s instances."""
    return KNOWN_HOSTS_DIR.expanduser() / check_fleet_id(fleet)


def write_known_hosts(fleet: str, members: Sequence[Member]) -> Path:
    """Pin each member's announced host keys to its EC2 addresses (mode 0600).

    Spot addresses are recycled: an address that was another instance's yesterday is
    this one's today, so SSH must check the key this instance announced, not the one
    it saw first (``accept-new``) or whatever a shared known_hosts holds.
    """
    path = known_hosts_path(fleet)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lines: list[str] = []
    for member in members:
        hosts = ",".join(h for h in (member.public_ip, member.private_ip) if h)
        if hosts:
            lines.extend(f"{hosts} {key}" for key in member.host_keys)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("".join(f"{line}\n" for line in lines))
    os.chmod(path, 0o600)
    return path


def _ssh_base(config: CloudConfig, fleet: str) -> list[str]:
    """ssh with the fleet's pinned host keys only: an instance whose key was not
    announced, or differs, is refused (StrictHostKeyChecking=yes)."""
    cmd = [
        "ssh",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={known_hosts_path(fleet)}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "ServerAliveInterval=30",
        "-o", "ConnectTimeout=10",
    ]  # fmt: skip
    key = _private_key(config)
    if key is not None:
        cmd += ["-i", str(key)]
    return cmd


@contextlib.contextmanager
def _tunnel(
    command: list[str], port: int, what: str, timeout: float = 30.0
) -> Iterator[tuple[str, int]]:
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while not reachable("127.0.0.1", port, 0.5):
            if proc.poll() is not None:
                err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace")
                raise FleetError(
                    f"{what} failed (exit status {proc.returncode}): {err.strip()[-500:]}"
                )
            if time.monotonic() > deadline:
                raise FleetError(f"{what} did not open local port {port} within {timeout:.0f}s")
            time.sleep(0.2)
        yield ("127.0.0.1", port)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def ssh_route(node: GridNode, config: CloudConfig, local_port: int):
    """``ssh -L`` through the redis node's public address (the security group admits
    SSH from ``ssh_from`` only)."""
    if not node.public_ip or shutil.which("ssh") is None:
        return None
    port = local_port or _free_port()
    command = [
        *_ssh_base(config, node.fleet), "-N", "-o", "ExitOnForwardFailure=yes",
        "-L", f"127.0.0.1:{port}:{node.address}:{node.port}", f"{SSH_USER}@{node.public_ip}",
    ]  # fmt: skip
    return _tunnel(command, port, f"the SSH tunnel to {node.instance_id}")


def ssm_route(node: GridNode, config: CloudConfig, local_port: int):
    """An SSM port forward (``aws ssm start-session``).  Needs the AWS CLI with the
    session-manager-plugin here, ``ssm:StartSession`` for you and Session Manager
    rights for the instance role, which pygirder's least-privilege role does not
    grant: see docs/aws-fleet.md."""
    if shutil.which("aws") is None or shutil.which("session-manager-plugin") is None:
        return None
    port = local_port or _free_port()
    params = {
        "host": [node.address],
        "portNumber": [str(node.port)],
        "localPortNumber": [str(port)],
    }
    command = [
        "aws", "ssm", "start-session", "--region", config.region, "--target", node.instance_id,
        "--document-name", "AWS-StartPortForwardingSessionToRemoteHost",
        "--parameters", json.dumps(params),
    ]  # fmt: skip
    if config.profile:
        command += ["--profile", config.profile]
    return _tunnel(command, port, f"the SSM session to {node.instance_id}")


ROUTES: dict[str, Route] = {"direct": direct_route, "ssh": ssh_route, "ssm": ssm_route}


@contextlib.contextmanager
def grid_url(
    config: CloudConfig,
    fleet: str | None = None,
    *,
    via: str = "auto",
    aws: Aws | None = None,
    routes: Sequence[Route] | None = None,
    local_port: int = 0,
    password: bool = True,
) -> Iterator[str]:
    """``redis://:password@host:port/0`` of a fleet's grid, reachable from here while
    the context lasts.  ``via``: ``auto`` (direct, else SSH, else SSM), or one route;
    ``routes`` replaces the candidates altogether (a rehearsal's own resolution)."""
    from ..instance.supervisor import with_password

    aws = aws or Aws(config)
    node = redis_node(config, fleet, aws=aws)
    if routes is None:
        if via == "auto":
            routes = list(ROUTES.values())
        elif via in ROUTES:
            routes = [ROUTES[via]]
        else:
            raise ConfigError(f"--via {via!r}: expected auto, {', '.join(ROUTES)}")
    secret = redis_password(config, node.fleet, aws=aws) if password else None
    for route in routes:
        opened = route(node, config, local_port)
        if opened is None:
            continue
        with opened as (host, port):
            yield with_password(f"redis://{host}:{port}/0", secret)
        return
    raise FleetError(
        f"cannot reach the redis node {node.instance_id} ({node.address}"
        f"{', public ' + node.public_ip if node.public_ip else ''}) with "
        f"{via if via != 'auto' else 'a direct connection, SSH or SSM'}: check ssh_from "
        "and your SSH key, or use --via",
        code="Unreachable",
    )


# -------------------------------------------------------------------------- exec, ssh


@dataclass
class ExecResult:
    instance_id: str
    role: str
    address: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id, "role": self.role, "address": self.address,
            "returncode": self.returncode, "stdout": self.stdout, "stderr": self.stderr,
            "seconds": round(self.seconds, 3),
        }  # fmt: skip


# Runs ``argv`` on one instance and returns its output.  SSH on AWS; a rehearsal passes
# one that runs the command inside the simulated instance.
Runner = Callable[[InstanceRow, Sequence[str], float], ExecResult]


def ssh_command(
    config: CloudConfig, target: InstanceRow, jump: InstanceRow | None, argv: Sequence[str] = ()
) -> list[str]:
    """The ssh command line for an instance: directly when it has a public address,
    else through ``jump`` (the redis node).  Both hops check the fleet's pinned host
    keys: the jump runs as a ProxyCommand with the same options, because options on
    the command line do not reach a ``-J`` jump host."""
    base = _ssh_base(config, target.fleet)
    cmd = list(base)
    if target.public_ip:
        host = target.public_ip
    else:
        if jump is None or not jump.public_ip:
            raise FleetError(
                f"{target.instance_id} has no public address and the fleet has no public "
                "node to jump through"
            )
        # The jump never prompts: its stdin and stdout carry the connection.
        proxy = [*base, "-o", "BatchMode=yes", "-W", "%h:%p", f"{SSH_USER}@{jump.public_ip}"]
        cmd += ["-o", f"ProxyCommand={shlex.join(proxy)}"]
        host = target.private_ip or target.address
    cmd.append(f"{SSH_USER}@{host}")
    if argv:
        cmd += ["--", " ".join(argv)]  # the remote shell reads it, as ssh does
    return cmd


def ssh_runner(config: CloudConfig, jump: InstanceRow | None) -> Runner:
    def run(row: InstanceRow, argv: Sequence[str], timeout: float) -> ExecResult:
        started = time.monotonic()
        try:
            command = ssh_command(config, row, jump, argv)
        except FleetError as exc:
            return ExecResult(row.instance_id, row.role, row.address, 255, "", str(exc), 0.0)
        command[1:1] = ["-o", "BatchMode=yes"]
        try:
            proc = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, check=False,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
            code, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            code, out, err = (
                124,
                _text(exc.stdout),
                _text(exc.stderr) + f"\ntimed out after {timeout}s",
            )
        return ExecResult(
            row.instance_id, row.role, row.address, code, out, err, time.monotonic() - started
        )

    return run


def _text(value: bytes | str | None) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value or ""


def exec_role(
    config: CloudConfig,
    role: str,
    argv: Sequence[str],
    *,
    fleet: str | None = None,
    aws: Aws | None = None,
    runner: Runner | None = None,
    parallel: int = 16,
    timeout: float = 300.0,
) -> list[ExecResult]:
    """Run ``argv`` on every running instance of ``role`` (``all`` for every role), in
    parallel; one result per instance, in the fleet's order."""
    if not argv:
        raise ConfigError("exec needs a command: pygirder cloud exec ROLE -- CMD ...")
    aws = aws or Aws(config)
    fleet = resolve_fleet(config, fleet, aws=aws)
    rows = [r for r in rows_of(aws, config.name, fleet, prices=False) if r.state == "running"]
    targets = [r for r in rows if role in ("all", r.role)]
    if not targets:
        raise NoFleetError(f"fleet {fleet} has no running {role} instance", code="NoInstance")
    if runner is None:
        jump = next((r for r in rows if r.role == "redis" and r.public_ip), None)
        runner = ssh_runner(config, jump)
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(targets)))) as pool:
        return list(pool.map(lambda row: runner(row, argv, timeout), targets))


def instance_row(
    config: CloudConfig, instance: str, *, aws: Aws
) -> tuple[InstanceRow, InstanceRow | None]:
    """An instance of one of this setup's fleets (by id) and its fleet's jump node."""
    rows = rows_of(aws, config.name, None, prices=False)
    row = next((r for r in rows if r.instance_id == instance), None)
    if row is None:
        raise NoFleetError(f"{instance} is not a live instance of a fleet of {config.name!r}")
    jump = next(
        (r for r in rows if r.fleet == row.fleet and r.role == "redis" and r.public_ip), None
    )
    return row, jump
