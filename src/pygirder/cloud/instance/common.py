"""What every part of the agent shares: its roles and events, its error, the seams.

``$PYGIRDER_IMDS_ENDPOINT`` is the one seam between a real and a simulated instance.
"""

from __future__ import annotations

import enum
import importlib.metadata
import logging
import os
from datetime import UTC, datetime

from ..aws import RetryPolicy

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


class Event(enum.StrEnum):
    """What an instance announces on the status topic."""

    UP = "up"  # booted and running its user-data; nothing installed yet
    READY = "ready"  # its service is serving (Redis answers PING / worker is up)
    GOING_AWAY = "going-away"  # stopping: spot interruption, time-to-live or SIGTERM
    REBALANCE = "rebalance"  # spot: at elevated risk of interruption, still serving
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
