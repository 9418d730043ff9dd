"""A fleet's names and tags: fleet ids, launch ids, the filters that find it by tag."""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ..aws import LIVE_INSTANCE_STATES, Aws
from ..config import CloudConfig
from ..instance.common import Role
from ..tags import (
    TAG_EXPIRES,
    TAG_FLEET,
    TAG_ROLE,
    as_tag_list,
    fleet_filters,
    ownership_tags,
    stamp,
    utcnow,
)

# The launch an instance belongs to: ``<fleet>-<role>``, also in its user-data, so an
# announcement is matched to the launch that asked for it.
TAG_LAUNCH = "pygirder:launch"
# Where the SSH host keys of each fleet's instances are pinned: one known_hosts file
# per fleet, written by ``up`` from what the instances announced.
KNOWN_HOSTS_DIR = Path("~/.pygirder/known_hosts")

# x86-64 types of one size with plenty of spot capacity; ``--instance-types`` overrides.
DEFAULT_INSTANCE_TYPES = (
    "m7a.large",
    "m6a.large",
    "m6i.large",
    "c7a.large",
    "c6a.large",
    "c6i.large",
)
DEFAULT_TTL_S = 4 * 3600.0
DEFAULT_DEADLINE_S = 600.0
SSH_USER = "ec2-user"  # Amazon Linux, the template image's base
# The launch minute, then 64 random bits (older fleets have 16: still accepted).
_FLEET_ID_RE = re.compile(r"^fl-[0-9]{8}-[0-9]{4}-(?:[0-9a-f]{16}|[0-9a-f]{4})$")
FLEET_ID_RANDOM_BYTES = 8

# ------------------------------------------------------------------------ helpers


def new_fleet_id(now: datetime | None = None) -> str:
    """``fl-YYYYMMDD-HHMM-<16 hex>``: sortable by launch time, and 64 random bits, so
    nobody guesses the id of the next fleet (its SSM path, its launch ids)."""
    now = now or utcnow()
    return f"fl-{now:%Y%m%d-%H%M}-{secrets.token_hex(FLEET_ID_RANDOM_BYTES)}"


def check_fleet_id(fleet: str) -> str:
    if not _FLEET_ID_RE.match(fleet):
        raise ConfigError(
            f"--fleet {fleet!r} is not a fleet id (fl-YYYYMMDD-HHMM- and 16 hex digits, "
            "as `pygirder cloud fleet` lists them)"
        )
    return fleet


def launch_id(fleet: str, role: Role | str) -> str:
    return f"{fleet}-{Role(role)}"


def fleet_tags(config: CloudConfig, fleet: str, expires: datetime, role: str | None = None) -> dict:
    tags = {
        **config.tags,
        **ownership_tags(config.name),
        TAG_FLEET: fleet,
        TAG_EXPIRES: stamp(expires),
    }
    if role:
        tags[TAG_ROLE] = role
        tags[TAG_LAUNCH] = launch_id(fleet, role)
        tags["Name"] = f"pygirder-{config.name}-{fleet}-{role}"
    return tags


def put_fleet_parameter(
    aws: Aws, config: CloudConfig, fleet: str, name: str, value: str, *,
    description: str, expires: datetime,
) -> None:  # fmt: skip
    """Write one of the fleet's SSM parameters; the first write tags it as the fleet's,
    so ``down`` removes it with the rest."""
    exists = aws.call("ssm", "get_parameter", Name=name, ignore=("ParameterNotFound",))
    params: dict[str, Any] = {"Name": name, "Value": value, "Type": "String"}
    if exists:
        aws.call("ssm", "put_parameter", Overwrite=True, **params)
    else:
        tags = as_tag_list(fleet_tags(config, fleet, expires))
        aws.call("ssm", "put_parameter", Description=description, Tags=tags, **params)


def describe_instances(aws: Aws, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for page in aws.pages("ec2", "describe_instances", Filters=filters):
        for reservation in page.get("Reservations", []):
            out.extend(reservation.get("Instances", []))
    return out


def instances_of(
    aws: Aws,
    name: str | None,
    fleet: str | None = None,
    states: Sequence[str] = LIVE_INSTANCE_STATES,
) -> list[dict[str, Any]]:
    """Instances of a fleet (or of every fleet of ``name``) in ``states``, by tag."""
    filters = [*fleet_filters(name, fleet), {"Name": "instance-state-name", "Values": list(states)}]
    return describe_instances(aws, filters)
