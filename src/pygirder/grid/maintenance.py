"""Garbage collection of a grid's server-side state: `pygirder gc` and ``Grid.gc()``.

Results are kept until dropped (or until their TTL, when workers set one).  ``gc``
drops what nobody has touched for a given age, measured with the server's own idle
clock (``OBJECT IDLETIME``), so a result that is read keeps living.  Requests that are
still pending are dropped only when nobody waits for them any more.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..store.keys import Keys, glob_escape

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``2h``, ``7d``, ``1w`` -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(text))
    if not match:
        raise ConfigError(f"age {text!r}: expected a number with an optional unit s, m, h, d, w")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


@dataclass
class GcReport:
    """What a collection dropped (or would drop, in a dry run), by kind of key."""

    dropped: dict[str, int] = field(default_factory=dict)
    kept: int = 0
    dry_run: bool = False

    @property
    def total(self) -> int:
        return sum(self.dropped.values())


def _idle_kinds(keys: Keys) -> dict[str, str]:
    """What a collection drops when idle: kind -> the stem of its keys."""
    return {"results": keys.result(""), "call graph": keys.call(""),
            "children": keys.children(""), "inboxes": keys.inbox("")}  # fmt: skip


def collect_garbage(
    client: Any, namespace: str, older_than: float, *, dry_run: bool = False, batch: int = 500
) -> GcReport:
    """Drop keys of ``namespace`` idle for longer than ``older_than`` seconds.

    ``client`` is a sync redis-py client.  Scanning is incremental (SCAN), so a large
    grid is collected without blocking the server.
    """
    if older_than < 0:
        raise ConfigError(f"older_than={older_than}: must be 0 or more seconds")
    keys = Keys(namespace)
    report = GcReport(dry_run=dry_run)
    for kind, stem in _idle_kinds(keys).items():
        report.dropped[kind] = _drop_idle(
            client, glob_escape(stem) + "*", older_than, dry_run, batch, report
        )
    report.dropped["abandoned requests"] = _drop_abandoned(client, keys, older_than, dry_run)
    if (
        not dry_run
        and client.llen(keys.dead_letters)
        and (client.object("idletime", keys.dead_letters) or 0) > older_than
    ):
        report.dropped["dead letters"] = client.llen(keys.dead_letters)
        client.unlink(keys.dead_letters)
    return report


def _drop_idle(
    client: Any, pattern: str, older_than: float, dry_run: bool, batch: int, report: GcReport
) -> int:
    dropped = 0
    chunk: list[Any] = []
    for key in client.scan_iter(match=pattern, count=batch):
        chunk.append(key)
        if len(chunk) >= batch:
            dropped += _drop_chunk(client, chunk, older_than, dry_run, report)
            chunk = []
    if chunk:
        dropped += _drop_chunk(client, chunk, older_than, dry_run, report)
    return dropped


def _drop_chunk(
    client: Any, chunk: list[Any], older_than: float, dry_run: bool, report: GcReport
) -> int:
    with client.pipeline(transaction=False) as pipe:
        for key in chunk:
            pipe.object("idletime", key)
        idle = pipe.execute()
    old = [k for k, t in zip(chunk, idle, strict=True) if t is not None and t > older_than]
    report.kept += len(chunk) - len(old)
    if old and not dry_run:
        client.unlink(*old)
    return len(old)


def _drop_abandoned(client: Any, keys: Keys, older_than: float, dry_run: bool) -> int:
    """Pending requests idle for the age with no waiter left and no live owner."""
    dropped = 0
    stem = keys.state("")
    for key in client.scan_iter(match=glob_escape(stem) + "*", count=500):
        idle = client.object("idletime", key) or 0
        if idle <= older_than:
            continue
        request_id = key.decode()[len(stem) :]
        if client.scard(keys.waiters(request_id)):
            continue
        owner = client.hget(key, "o")
        if owner and client.exists(keys.heartbeat(owner.decode())):
            continue
        dropped += 1
        if not dry_run:
            pool = (client.hget(key, "pool") or b"default").decode()
            client.lrem(keys.queue(pool), 0, request_id)
            client.unlink(key)
    return dropped
