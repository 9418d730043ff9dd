"""What plan, setup, status and teardown report: one :class:`Item` per resource.

:class:`Found` is a resource as discovered in AWS, :class:`Drift` one difference from
the config; the small JSON helpers compare policies and documents the way AWS
returns them (URL-encoded, reordered).
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from typing import Any

# ---------------------------------------------------------------- the results


class Action(enum.StrEnum):
    """What plan/setup/teardown do (or did) to one resource."""

    CREATE = "create"  # missing: setup creates it
    UPDATE = "update"  # exists but differs from the config: setup fixes it in place
    REPLACE = "replace"  # exists but cannot be fixed in place: setup deletes and re-creates
    NONE = "ok"  # exists as configured: nothing to do
    DELETE = "delete"  # exists but is no longer wanted (or teardown): it is deleted
    CONFLICT = "conflict"  # blocked: a name clash, duplicates, or a change needing teardown
    FAILED = "failed"  # the operation failed (teardown continues with the rest)


@dataclass
class Item:
    """One row of a report: a resource (or a missing one) and what happens to it."""

    key: str  # the kind, e.g. "vpc", "billing-alarm-10"
    title: str  # for people, e.g. "VPC"
    name: str  # pygirder's name for it
    action: Action | None = None
    id: str = ""  # AWS id or ARN, once it exists
    state: str = ""  # "available", "running", "stopped", "missing", ...
    monthly_usd: float | None = None  # idle cost while it exists in this state
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["action"] = self.action.value if self.action else None
        return data


@dataclass
class Report:
    """What a command found or did; ``remaining`` lists tagged leftovers (teardown)."""

    command: str
    items: list[Item] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    remaining: list[str] = field(default_factory=list)

    @property
    def changes(self) -> list[Item]:
        return [i for i in self.items if i.action not in (None, Action.NONE)]

    @property
    def conflicts(self) -> list[Item]:
        return [i for i in self.items if i.action is Action.CONFLICT]

    @property
    def failures(self) -> list[Item]:
        return [i for i in self.items if i.action is Action.FAILED]

    @property
    def total_monthly_usd(self) -> float:
        return round(sum(i.monthly_usd or 0.0 for i in self.items), 2)

    @property
    def ok(self) -> bool:
        return not self.conflicts and not self.failures and not self.remaining

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "items": [i.to_dict() for i in self.items],
            "warnings": list(self.warnings),
            "remaining": list(self.remaining),
            "total_monthly_usd": self.total_monthly_usd,
            "ok": self.ok,
        }


@dataclass
class Found:
    """A resource pygirder created, as discovered now."""

    id: str
    name: str = ""
    state: str = "available"
    arn: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Drift:
    """One difference between a resource and the config, and how setup fixes it."""

    action: Action  # UPDATE, REPLACE or CONFLICT (needs teardown, or a person)
    text: str


# ----------------------------------------------------------------- small helpers


def as_json(value: Any) -> dict[str, Any]:
    """A policy document as a dict, whether AWS returned a dict or (encoded) text."""
    if isinstance(value, dict):
        return value
    if not value:
        return {}
    from urllib.parse import unquote

    text = str(value)
    if text.startswith("%7B"):
        text = unquote(text)
    return json.loads(text)


def same_json(a: Any, b: Any) -> bool:
    return _canonical(a) == _canonical(b)


def _canonical(value: Any) -> Any:
    """Compare policies as IAM does: key order and one-element lists do not matter."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        items = [_canonical(v) for v in value]
        if len(items) == 1 and not isinstance(items[0], dict):
            return items[0]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    return value


def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} B"  # pragma: no cover
