"""What the instance tells the operator: announcements on the fleet's status topic,
its SSH host keys, and the AWS calls (SNS, SSM) behind them.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ..aws import client_config, is_transient
from ..errors import AgentError
from .common import (
    ANNOUNCEMENT_SCHEMA,
    AWS_RETRY,
    Event,
    _iso,
    _utcnow,
    pygirder_version,
)
from .metadata import InstanceMetadata

log = logging.getLogger("pygirder.agent")


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


def fleet_parameter(name: str, fleet: str, leaf: str) -> str:
    """The SSM name of one of a fleet's parameters (``redis-password``,
    ``redis-address``, ``target``): all live below ``/pygirder/<name>/<fleet>/``, which
    is what the instance and controller policies grant and what ``down`` removes."""
    return f"/pygirder/{name}/{fleet}/{leaf}"


def redis_password_parameter(name: str, fleet: str) -> str:
    return fleet_parameter(name, fleet, "redis-password")


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
