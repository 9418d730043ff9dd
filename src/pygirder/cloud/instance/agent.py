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

Each command is a service of the shared CLI helper (``pygirder.cli.service``): it takes
``--log-level``, ``--id``, ``--opts`` and ``--json``, and a failure ends with
``error: <type>: <message>`` on stderr and exit status 1 (2 for bad options).

What it talks to:

- **IMDSv2** at ``http://169.254.169.254``, or at ``$PYGIRDER_IMDS_ENDPOINT`` (the one
  seam; a simulated instance sets it to an :class:`~pygirder.cloud.sim.imds.ImdsEmulator`).
  A session token is fetched first and renewed on 401.
- **SNS**: one JSON :class:`Announcement` per event (``up``, ``ready``, ``going-away``,
  ``failed``) on the fleet's status topic, whose region is read from the topic ARN.
- **SSM**: the Redis password, a SecureString at ``/pygirder/<name>/<fleet>/redis-password``,
  read at run time with the instance role and never written to a log or argv of ours.
- **S3**: the artifact (see ``artifacts.py``).

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
holds) and announces ``going-away``; the **time-to-live** (``--ttl`` or ``--expires``)
announces ``going-away``, stops the child and runs ``--shutdown-command`` (default
``sudo shutdown -h now``; instances are launched with shutdown behaviour
*terminate*), so a lost laptop never leaves a bill running.  On a simulated instance
(``PYGIRDER_IMDS_ENDPOINT`` set) the default shutdown command is never run: only an
explicit ``--shutdown-command`` is.
"""

from __future__ import annotations

import base64
import binascii
import enum
import importlib.metadata
import json
import logging
import os
import shlex
import signal
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from ...cli.service import service
from ...errors import ConfigError, PygirderError
from ..aws import RetryPolicy, client_config, is_transient

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

DEFAULT_IMDS_ENDPOINT = "http://169.254.169.254"
DEFAULT_SHUTDOWN_COMMAND = "sudo shutdown -h now"
DEFAULT_REDIS_PORT = 6379
# How often the spot watcher asks IMDS for an interruption notice (AWS gives two minutes).
DEFAULT_SPOT_INTERVAL_S = 5.0
# Schema of the announcement JSON; bump when a field changes meaning.
ANNOUNCEMENT_SCHEMA = 1
# AWS calls: the operator's retry policy and error codes (aws.py), with waits short
# enough for a boot.
AWS_RETRY = RetryPolicy(attempts=6, base_delay=0.5, max_delay=8.0)


class AgentError(PygirderError):
    """The agent cannot do its job (metadata unreachable, service keeps crashing, ...)."""


class Event(enum.StrEnum):
    """What an instance announces on the status topic."""

    UP = "up"  # booted and running its user-data; nothing installed yet
    READY = "ready"  # its service is serving (Redis answers PING / worker is up)
    GOING_AWAY = "going-away"  # stopping: spot interruption, time-to-live or SIGTERM
    FAILED = "failed"  # the user-data or the service failed; details in ``detail``


class Role(enum.StrEnum):
    """The service an instance runs."""

    REDIS = "redis"  # the grid's Valkey server, on the private address
    DISTRIBUTOR = "distributor"  # links a child pool to a parent pool
    WORKER = "worker"  # one worker process per core


def _env(name: str) -> str | None:
    """Every environment variable the agent reads goes through here."""
    value = os.environ.get(name)
    return value or None


def imds_endpoint() -> str:
    return (_env("PYGIRDER_IMDS_ENDPOINT") or DEFAULT_IMDS_ENDPOINT).rstrip("/")


def is_simulated() -> bool:
    """True on a simulated instance: IMDS is an emulator, the host is someone's machine."""
    return _env("PYGIRDER_IMDS_ENDPOINT") is not None


def pygirder_version() -> str:
    try:
        return importlib.metadata.version("pygirder")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _backoff(attempt: int, *, base: float, cap: float) -> float:
    """Jittered exponential backoff: attempt 1 waits up to ``base``, then doubles."""
    return RetryPolicy(attempts=attempt, base_delay=base, max_delay=cap).delay(attempt)


def mask_url(text: str) -> str:
    """Replace the password of every ``scheme://user:password@`` in ``text`` with ***."""
    import re

    return re.sub(r"(://[^:/@\s]*:)[^@\s]+@", r"\1***@", text)


# -- IMDSv2 ----------------------------------------------------------------------------
@dataclass(frozen=True)
class InstanceMetadata:
    """What the agent knows about its instance, read once from IMDS."""

    instance_id: str
    private_ip: str
    public_hostname: str | None
    zone: str
    region: str
    instance_type: str
    lifecycle: str
    ami_id: str


class ImdsClient:
    """A small IMDSv2 client: token first, renewed on 401; connection errors retried."""

    TOKEN_TTL_S = 21600

    def __init__(
        self, endpoint: str | None = None, *, timeout: float = 2.0, attempts: int = 5
    ) -> None:
        self.endpoint = (endpoint or imds_endpoint()).rstrip("/")
        self.timeout = timeout
        self.attempts = attempts
        self._token: str | None = None
        self._lock = threading.Lock()

    def _request(self, method: str, path: str, headers: Mapping[str, str]) -> bytes | None:
        req = urllib.request.Request(self.endpoint + path, method=method, headers=dict(headers))
        # IMDS is link-local: never go through a proxy, whatever the environment says.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 404:
                return None
            raise

    def token(self, refresh: bool = False) -> str:
        with self._lock:
            if self._token is None or refresh:
                body = self._request(
                    "PUT",
                    "/latest/api/token",
                    {"X-aws-ec2-metadata-token-ttl-seconds": str(self.TOKEN_TTL_S)},
                )
                if not body:
                    raise AgentError(f"IMDS at {self.endpoint} returned no session token")
                self._token = body.decode()
            return self._token

    def _get_once(self, path: str, token: str) -> bytes | None:
        try:
            return self._request("GET", f"/latest/{path}", {"X-aws-ec2-metadata-token": token})
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                raise _Unauthorized(str(exc)) from exc
            raise

    def get(self, path: str) -> str | None:
        """GET ``/latest/<path>``: the text, or None when IMDS says 404.

        A 401 (expired token) gets a new token and one more try; connection errors and
        5xx are retried with backoff; anything else is an :class:`AgentError`.
        """
        path = path.lstrip("/")
        last: Exception | None = None
        refresh = False
        for attempt in range(1, self.attempts + 1):
            try:
                body = self._get_once(path, self.token(refresh=refresh))
                return None if body is None else body.decode()
            except _Unauthorized as exc:
                last, refresh = exc, True
                continue
            except urllib.error.HTTPError as exc:
                if exc.code < 500:
                    last = exc
                    break
                last = exc
            except OSError as exc:  # URLError, timeouts, connection refused
                last = exc
            if attempt < self.attempts:
                time.sleep(_backoff(attempt, base=0.2, cap=2.0))
        raise AgentError(
            f"cannot read {path} from the instance metadata service at {self.endpoint}: {last}"
            " (on EC2 check that IMDS is enabled; a simulation must set PYGIRDER_IMDS_ENDPOINT)"
        )

    def require(self, path: str) -> str:
        value = self.get(path)
        if value is None:
            raise AgentError(f"the instance metadata service has no {path}")
        return value

    def metadata(self) -> InstanceMetadata:
        zone = self.require("meta-data/placement/availability-zone")
        return InstanceMetadata(
            instance_id=self.require("meta-data/instance-id"),
            private_ip=self.require("meta-data/local-ipv4"),
            public_hostname=self.get("meta-data/public-hostname") or None,
            zone=zone,
            region=self.get("meta-data/placement/region") or zone.rstrip(string.ascii_lowercase),
            instance_type=self.require("meta-data/instance-type"),
            lifecycle=self.get("meta-data/instance-life-cycle") or "on-demand",
            ami_id=self.get("meta-data/ami-id") or "",
        )

    def spot_action(self) -> dict[str, str] | None:
        """The pending spot interruption notice, or None."""
        body = self.get("meta-data/spot/instance-action")
        if body is None:
            return None
        try:
            notice = json.loads(body)
        except ValueError:
            notice = {"action": "unknown", "time": body.strip()}
        return {"action": str(notice.get("action", "")), "time": str(notice.get("time", ""))}


class _Unauthorized(Exception):
    pass


# -- AWS calls ---------------------------------------------------------------------------
def _client(service: str, region: str | None) -> Any:
    try:
        import boto3
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise AgentError("the agent needs boto3: pip install 'pygirder[cloud]'") from exc
    config = client_config(connect_timeout=5, read_timeout=15)
    return boto3.client(service, region_name=region, config=config)


def _is_transient(exc: Exception) -> bool:
    try:
        from botocore.exceptions import (
            ClientError,
            NoCredentialsError,
        )
        from botocore.exceptions import (
            ConnectionError as BotoConnectionError,
        )
    except ImportError:  # pragma: no cover
        return False
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return is_transient(str(err.get("Code", "")), int(status or 0) or None)
    # An instance profile can take a few seconds to be usable right after launch.
    return isinstance(exc, BotoConnectionError | NoCredentialsError)


def _with_retries(what: str, call: Callable[[], Any], *, attempts: int = AWS_RETRY.attempts) -> Any:
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as exc:
            if not _is_transient(exc) or attempt == attempts:
                raise AgentError(f"{what} failed: {exc}") from exc
            delay = AWS_RETRY.delay(attempt)
            log.warning("%s failed (%s); retrying in %.1fs", what, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def region_of_arn(arn: str) -> str:
    parts = arn.split(":")
    if len(parts) < 6 or parts[0] != "arn" or not parts[3]:
        raise ConfigError(f"--topic-arn {arn!r} is not an SNS topic ARN (arn:aws:sns:REGION:...)")
    return parts[3]


def redis_password_parameter(name: str, fleet: str) -> str:
    return f"/pygirder/{name}/{fleet}/redis-password"


def read_redis_password(name: str, fleet: str, *, region: str | None = None) -> str:
    """The fleet's Redis password from SSM (SecureString, decrypted with the instance role)."""
    parameter = redis_password_parameter(name, fleet)
    ssm = _client("ssm", region)
    try:
        response = _with_retries(
            f"reading SSM parameter {parameter}",
            lambda: ssm.get_parameter(Name=parameter, WithDecryption=True),
        )
    except AgentError as exc:
        raise AgentError(
            f"{exc}; the fleet launcher stores the password there and the instance role "
            "must be allowed ssm:GetParameter on it (and kms:Decrypt on its key)"
        ) from exc.__cause__
    return str(response["Parameter"]["Value"])


# -- announcements -----------------------------------------------------------------------
@dataclass(frozen=True)
class Announcement:
    """One status message from an instance, as published on the SNS topic (JSON)."""

    event: str
    launch_id: str
    role: str
    instance_id: str
    private_ip: str
    public_hostname: str | None
    zone: str
    instance_type: str
    lifecycle: str
    pygirder_version: str
    time: str
    fleet: str = ""
    detail: str = ""
    ami_id: str = ""
    host_keys: tuple[str, ...] = ()
    """The instance's SSH host public keys (``type base64``), so that SSH to it can pin
    them instead of trusting whatever answers first on a recycled spot address."""
    schema: int = ANNOUNCEMENT_SCHEMA
    kind: str = "pygirder.instance-event"

    @classmethod
    def make(
        cls,
        event: Event | str,
        *,
        launch_id: str,
        role: str,
        meta: InstanceMetadata,
        fleet: str = "",
        detail: str = "",
    ) -> Announcement:
        return cls(
            event=str(Event(event)),
            launch_id=launch_id,
            role=role,
            instance_id=meta.instance_id,
            private_ip=meta.private_ip,
            public_hostname=meta.public_hostname,
            zone=meta.zone,
            instance_type=meta.instance_type,
            lifecycle=meta.lifecycle,
            pygirder_version=pygirder_version(),
            time=_iso(_utcnow()),
            fleet=fleet,
            detail=detail,
            ami_id=meta.ami_id,
            host_keys=read_host_keys(),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_message(cls, body: str) -> Announcement:
        """Parse an SQS message body: an SNS envelope or the raw JSON (raw delivery)."""
        data = json.loads(body)
        if isinstance(data, dict) and data.get("Type") == "Notification" and "Message" in data:
            data = json.loads(data["Message"])
        if not isinstance(data, dict) or data.get("kind") != "pygirder.instance-event":
            raise ValueError("not a pygirder instance announcement")
        known = set(cls.__dataclass_fields__)
        fields = {k: v for k, v in data.items() if k in known}
        fields["host_keys"] = host_key_lines(fields.get("host_keys"))
        return cls(**fields)


# Where sshd keeps its host keys; a simulated instance's environment may point elsewhere.
HOST_KEY_DIR_ENV = "PYGIRDER_SSH_HOST_KEY_DIR"
_HOST_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                   "ecdsa-sha2-nistp521", "ssh-rsa")  # fmt: skip
_MAX_HOST_KEYS = 8
_MAX_HOST_KEY_CHARS = 4096


def host_key_lines(value: Any) -> tuple[str, ...]:
    """Well-formed ``type base64`` host key lines out of ``value`` (anything else is
    dropped: the lines go into a known_hosts file)."""
    if not isinstance(value, list | tuple):
        return ()
    out = []
    for line in value[:_MAX_HOST_KEYS]:
        if not isinstance(line, str) or len(line) > _MAX_HOST_KEY_CHARS:
            continue
        parts = line.split()
        if len(parts) >= 2 and parts[0] in _HOST_KEY_TYPES and _is_base64(parts[1]):
            out.append(f"{parts[0]} {parts[1]}")
    return tuple(out)


def _is_base64(text: str) -> bool:
    try:
        return bool(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        return False


def read_host_keys(directory: str | os.PathLike[str] | None = None) -> tuple[str, ...]:
    """This machine's SSH host public keys (``/etc/ssh/ssh_host_*_key.pub``)."""
    folder = Path(directory or os.environ.get(HOST_KEY_DIR_ENV) or "/etc/ssh")
    lines = []
    try:
        paths = sorted(folder.glob("ssh_host_*_key.pub"))
    except OSError:
        return ()
    for path in paths:
        try:
            lines.append(path.read_text(encoding="ascii", errors="replace").strip())
        except OSError:
            continue
    return host_key_lines(lines)


def publish_announcement(topic_arn: str, announcement: Announcement) -> str:
    """Publish on the status topic (retrying transient errors); returns the message id."""
    sns = _client("sns", region_of_arn(topic_arn))
    attributes = {
        key: {"DataType": "String", "StringValue": value}
        for key, value in (
            ("event", announcement.event),
            ("launch_id", announcement.launch_id),
            ("role", announcement.role),
            ("instance_id", announcement.instance_id),
        )
        if value
    }
    response = _with_retries(
        f"announcing {announcement.event} on {topic_arn}",
        lambda: sns.publish(
            TopicArn=topic_arn, Message=announcement.to_json(), MessageAttributes=attributes
        ),
    )
    log.info("announced %s (%s)", announcement.event, announcement.detail or "no detail")
    return str(response["MessageId"])


class Announcer:
    """Announces events of one instance; thread-safe, each event kind at most once if asked."""

    def __init__(
        self,
        topic_arn: str,
        *,
        launch_id: str,
        role: str,
        meta: InstanceMetadata,
        fleet: str = "",
    ) -> None:
        region_of_arn(topic_arn)  # fail early on a malformed ARN
        self.topic_arn = topic_arn
        self.launch_id = launch_id
        self.role = role
        self.meta = meta
        self.fleet = fleet
        self._sent: set[str] = set()
        self._lock = threading.Lock()

    def send(self, event: Event, detail: str = "", *, once: bool = False) -> bool:
        """Publish; with ``once`` a second announcement of the same event is skipped.

        Errors are logged, not raised: losing a status message must not stop a service.
        """
        with self._lock:
            if once and event in self._sent:
                return False
            self._sent.add(event)
        message = Announcement.make(
            event, launch_id=self.launch_id, role=self.role, meta=self.meta,
            fleet=self.fleet, detail=detail,
        )  # fmt: skip
        try:
            publish_announcement(self.topic_arn, message)
        except AgentError as exc:
            log.error("%s", exc)
            return False
        return True


# -- the supervised service ------------------------------------------------------------
def service_command(
    role: Role | str,
    *,
    bind: str = "127.0.0.1",
    port: int = DEFAULT_REDIS_PORT,
    password_file: str | os.PathLike[str] | None = None,
    pool: str = "default",
    parent: str | None = None,
    imports: Sequence[str] = (),
    processes: str = "auto",
    python: str | None = None,
) -> list[str]:
    """The command line of a role's service, run with this interpreter (``-m pygirder``).

    It never holds a password: the Redis URL of workers and distributors goes in their
    environment (:func:`service_environment`), the server reads a password file.
    """
    base = [python or sys.executable, "-m", "pygirder"]
    role = Role(role)
    if role is Role.REDIS:
        cmd = [*base, "server", "--bind", bind, "--port", str(port)]
        if password_file:
            cmd += ["--password-file", str(password_file)]
        return cmd
    if role is Role.DISTRIBUTOR:
        if not parent:
            raise ConfigError("role distributor needs --parent POOL (the pool it links up to)")
        return [*base, "distributor", "--pool", pool, "--parent", parent]
    cmd = [*base, "worker", "--pool", pool, "--processes", processes]
    for module in imports:
        cmd += ["--import", module]
    return cmd


def service_environment(
    role: Role | str, redis_url: str | None, password: str | None
) -> dict[str, str]:
    """Extra environment of a role's service: ``PYGIRDER_REDIS``, the URL with the password.

    ``pygirder worker`` and ``pygirder distributor`` read ``--redis`` from that variable,
    which keeps the password out of ``ps`` and of every command line we log.
    """
    if Role(role) is Role.REDIS:
        return {}
    if not redis_url:
        raise ConfigError(f"role {role} needs --redis URL (the address of the grid's Redis node)")
    return {"PYGIRDER_REDIS": with_password(redis_url, password)}


def with_password(url: str, password: str | None) -> str:
    """``redis://host:port/db`` with the password put in (percent-encoded)."""
    if not password:
        return url
    parts = urllib.parse.urlsplit(url if "://" in url else f"redis://{url}")
    host = parts.hostname or ""
    netloc = f":{urllib.parse.quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path or "/0", parts.query, ""))


ReadyProbe = Callable[[subprocess.Popen, float], bool]


def alive_for(grace_s: float) -> ReadyProbe:
    """Ready once the child has been running for ``grace_s`` seconds."""
    return lambda proc, elapsed: proc.poll() is None and elapsed >= grace_s


def redis_answers(host: str, port: int, password: str | None) -> ReadyProbe:
    """Ready once the server answers PING (after AUTH with the password)."""
    from ...server import _ping  # one raw RESP round trip, no client retries

    return lambda proc, elapsed: _ping(host, port, password, 1.0)


class Supervisor:
    """Run one child process, restart it when it exits, stop it on request.

    ``run()`` blocks until ``stop()`` is called (returns normally once the child has
    exited) or until the child failed ``max_restarts`` times in a row without staying
    up for ``stable_after_s`` (raises :class:`AgentError`).  ``stop()`` is thread-safe:
    it sends SIGTERM to the child at once, then ``run()`` waits up to
    ``stop_timeout_s`` before SIGKILLing the child's process group.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        ready_probe: ReadyProbe | None = None,
        on_ready: Callable[[], object] | None = None,
        ready_timeout_s: float = 120.0,
        max_restarts: int = 5,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 60.0,
        stable_after_s: float = 60.0,
        stop_timeout_s: float = 30.0,
        poll_s: float = 0.1,
    ) -> None:
        self.command = list(command)
        self.env = dict(env) if env is not None else None
        self.ready_probe = ready_probe or alive_for(2.0)
        self.on_ready = on_ready
        self.ready_timeout_s = ready_timeout_s
        self.max_restarts = max_restarts
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.stable_after_s = stable_after_s
        self.stop_timeout_s = stop_timeout_s
        self.poll_s = poll_s
        self.starts = 0
        self.stop_reason: str | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._signalled: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self, reason: str) -> None:
        with self._lock:
            if self.stop_reason is None:
                self.stop_reason = reason
                log.info("stopping the service: %s", reason)
            self._stopping.set()
        self._signal_child()

    def _signal_child(self) -> None:
        with self._lock:
            proc = self._proc
            if proc is None or proc is self._signalled or proc.poll() is not None:
                return
            self._signalled = proc
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass

    def _start(self) -> subprocess.Popen:
        log.info("starting %s", mask_url(shlex.join(self.command)))
        proc = subprocess.Popen(
            self.command, env=self.env, stdin=subprocess.DEVNULL, start_new_session=True
        )
        with self._lock:
            self._proc = proc
        self.starts += 1
        if self._stopping.is_set():  # stop() raced with the start
            self._signal_child()
        return proc

    def _finish(self, proc: subprocess.Popen) -> int:
        try:
            return proc.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("service did not exit %ss after SIGTERM; killing it", self.stop_timeout_s)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return proc.wait()

    def run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            proc = self._start()
            ready = False
            while proc.poll() is None and not self._stopping.is_set():
                elapsed = time.monotonic() - started
                if not ready and self.ready_probe(proc, elapsed):
                    ready = True
                    log.info("service is ready (pid %d)", proc.pid)
                    if self.on_ready is not None:
                        self.on_ready()
                elif not ready and elapsed > self.ready_timeout_s:
                    log.error("service not ready after %.0fs; restarting it", elapsed)
                    proc.send_signal(signal.SIGTERM)
                    self._finish(proc)
                    break
                self._stopping.wait(self.poll_s)
            if self._stopping.is_set():
                self._signal_child()
                status = self._finish(proc)
                log.info("service exited with status %s", status)
                return
            status = proc.wait()
            ran = time.monotonic() - started
            failures = 1 if ran >= self.stable_after_s else failures + 1
            if failures > self.max_restarts:
                raise AgentError(
                    f"the service failed {failures} times in a row (last exit status {status}, "
                    f"after {ran:.1f}s); giving up. Command: {mask_url(shlex.join(self.command))}"
                )
            delay = _backoff(failures, base=self.backoff_base_s, cap=self.backoff_cap_s)
            log.warning(
                "service exited with status %s after %.1fs; restart %d/%d in %.1fs",
                status, ran, failures, self.max_restarts, delay,
            )  # fmt: skip
            self._stopping.wait(delay)


# -- watchers ----------------------------------------------------------------------------
class _Watcher(threading.Thread):
    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.done = threading.Event()

    def cancel(self, timeout: float = 60.0) -> None:
        """Stop watching; wait for a callback in progress (an announcement) to finish."""
        self.done.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join(timeout)


class SpotWatcher(_Watcher):
    """Polls IMDS for a spot interruption notice; calls ``on_notice(notice)`` once."""

    def __init__(
        self,
        imds: ImdsClient,
        on_notice: Callable[[dict[str, str]], None],
        interval_s: float = DEFAULT_SPOT_INTERVAL_S,
    ) -> None:
        super().__init__("spot-watcher")
        self.imds = imds
        self.on_notice = on_notice
        self.interval_s = interval_s

    def run(self) -> None:
        while not self.done.wait(self.interval_s):
            try:
                notice = self.imds.spot_action()
            except AgentError as exc:
                log.debug("spot check failed: %s", exc)
                continue
            if notice is not None:
                log.warning("spot interruption notice: %s at %s", notice["action"], notice["time"])
                self.on_notice(notice)
                return


class DeadlineWatcher(_Watcher):
    """Calls ``on_expiry()`` once at ``expires`` (immediately if it is already past)."""

    def __init__(self, expires: datetime, on_expiry: Callable[[], None]) -> None:
        super().__init__("ttl-watcher")
        self.expires = expires
        self.on_expiry = on_expiry

    def run(self) -> None:
        while True:
            remaining = (self.expires - _utcnow()).total_seconds()
            if remaining <= 0:
                break
            if self.done.wait(min(remaining, 60.0)):
                return
        log.warning("time-to-live ran out at %s", _iso(self.expires))
        self.on_expiry()


def resolve_expiry(ttl: float | None, expires: str | None) -> datetime | None:
    if ttl is not None and expires is not None:
        raise ConfigError("give --ttl or --expires, not both")
    if ttl is not None:
        if ttl <= 0:
            raise ConfigError(f"--ttl must be positive seconds, not {ttl}")
        return _utcnow() + timedelta(seconds=ttl)
    if expires is not None:
        try:
            when = datetime.fromisoformat(expires.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ConfigError(
                f"--expires {expires!r} is not an ISO time (e.g. 2026-01-01T12:00:00Z)"
            ) from exc
        return when if when.tzinfo else when.replace(tzinfo=UTC)
    return None


def shut_down(command: str | None) -> int:
    """Run the shutdown command; the default one is never run on a simulated instance."""
    if command is None:
        if is_simulated():
            log.warning(
                "simulated instance: not running %r on this host (pass --shutdown-command)",
                DEFAULT_SHUTDOWN_COMMAND,
            )
            return 0
        command = DEFAULT_SHUTDOWN_COMMAND
    log.warning("shutting the instance down: %s", command)
    try:
        proc = subprocess.run(shlex.split(command), check=False, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("shutdown command %r failed: %s", command, exc)
        return 1
    if proc.returncode != 0:
        log.error("shutdown command %r exited with status %d", command, proc.returncode)
    return proc.returncode


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
        if command is None and opts.name and opts.fleet:
            password = read_redis_password(opts.name, opts.fleet, region=region)
        if command is None:
            if opts.role is Role.REDIS:
                command, probe = _redis_service(opts, meta, password, Path(tmp))
            else:
                env.update(service_environment(opts.role, opts.redis, password))
                command = service_command(
                    opts.role, pool=opts.pool, parent=opts.parent, imports=opts.imports,
                    processes=opts.processes,
                )  # fmt: skip
                probe = alive_for(opts.ready_grace_s)
            ready_probe = ready_probe or probe
        supervisor = Supervisor(
            command,
            env=env,
            ready_probe=ready_probe or alive_for(opts.ready_grace_s),
            on_ready=lambda: announcer.send(Event.READY, "service is up", once=True),
            max_restarts=opts.max_restarts,
            stop_timeout_s=opts.stop_timeout_s,
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

        def on_expiry() -> None:
            expired.set()
            announcer.send(
                Event.GOING_AWAY, f"time-to-live ran out at {_iso(opts.expires)}", once=True
            )
            supervisor.stop("time-to-live ran out")

        watchers: list[_Watcher] = []
        if meta.lifecycle == "spot" and opts.spot_interval_s > 0:
            watchers.append(SpotWatcher(imds, on_spot, opts.spot_interval_s))
        if opts.expires is not None:
            watchers.append(DeadlineWatcher(opts.expires, on_expiry))

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
            supervisor.run()
        finally:
            for watcher in watchers:
                watcher.cancel()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for sender in senders:
                sender.join(60)
    if expired.is_set():
        shut_down(opts.shutdown_command)
    return 0


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
    from ..artifacts import install_artifact

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
) -> None:
    """Run the role's service: supervise it, watch for spot interruptions, honour the TTL."""
    _quiet_aws_loggers()
    opts = RunOptions(
        role=role, topic_arn=topic_arn, launch_id=launch_id, fleet=fleet, name=name,
        redis=redis, port=port, pool=pool, parent=parent, imports=tuple(imports or ()),
        processes=processes, expires=resolve_expiry(ttl, expires),
        shutdown_command=shutdown_command, spot_interval_s=spot_interval,
        ready_grace_s=ready_grace, max_restarts=max_restarts, region=region,
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
