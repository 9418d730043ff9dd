"""The tags that mark what pygirder owns in an AWS account, in one place.

Ownership is decided by tags, never by a local state file: a resource belongs to
pygirder only if it carries ``pygirder:managed=true``, and to the fleet called
``<name>`` only if it also carries ``pygirder:name=<name>``.  Everything pygirder
creates is tagged at creation (``TagSpecifications``), so there is no window in which
a resource exists untagged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

# Present (value "true") on every resource pygirder created.  Resources without it are
# never adopted, modified or deleted, even when their name matches.
TAG_MANAGED = "pygirder:managed"
MANAGED_VALUE = "true"
# The ``[cloud] name`` of the setup a resource belongs to (several setups may share an
# account: "default", "bench", ...).
TAG_NAME = "pygirder:name"
# Set by the fleet commands on instances, fleets and launch templates of one launch.
TAG_FLEET = "pygirder:fleet"
# What a fleet instance does: "redis", "distributor", "worker", "image-builder", ...
TAG_ROLE = "pygirder:role"
# ISO-8601 UTC time after which an orphan sweep may delete the resource.
TAG_EXPIRES = "pygirder:expires"
# Which account-level resource this is ("vpc", "public-subnet", "nat", ...), so two
# resources of one AWS type (two subnets, two route tables) are told apart by tag.
TAG_COMPONENT = "pygirder:component"

RESERVED_PREFIXES = ("aws:", "pygirder:")


def ownership_tags(name: str, component: str | None = None) -> dict[str, str]:
    """The tags that mark a resource as pygirder's, for the setup called ``name``."""
    tags = {TAG_MANAGED: MANAGED_VALUE, TAG_NAME: name}
    if component:
        tags[TAG_COMPONENT] = component
    return tags


def as_tag_list(tags: Mapping[str, str]) -> list[dict[str, str]]:
    """``{"k": "v"}`` -> ``[{"Key": "k", "Value": "v"}]`` (the EC2/IAM/SNS shape)."""
    return [{"Key": key, "Value": value} for key, value in tags.items()]


def from_tag_list(tags: Iterable[Mapping[str, str]] | None) -> dict[str, str]:
    """``[{"Key": "k", "Value": "v"}]`` -> ``{"k": "v"}``; ``None`` -> ``{}``."""
    return {tag["Key"]: tag.get("Value", "") for tag in tags or ()}


def is_owned(tags: Mapping[str, str], name: str) -> bool:
    """True when ``tags`` mark a resource as created by pygirder for setup ``name``."""
    return tags.get(TAG_MANAGED) == MANAGED_VALUE and tags.get(TAG_NAME) == name


def ec2_filters(name: str, component: str | None = None) -> list[dict]:
    """EC2 ``Filters`` that select what pygirder created for ``name`` (and component)."""
    filters = [
        {"Name": f"tag:{TAG_MANAGED}", "Values": [MANAGED_VALUE]},
        {"Name": f"tag:{TAG_NAME}", "Values": [name]},
    ]
    if component:
        filters.append({"Name": f"tag:{TAG_COMPONENT}", "Values": [component]})
    return filters


def fleet_filters(name: str | None, fleet: str | None = None) -> list[dict[str, Any]]:
    """EC2 filters for what a fleet (or any fleet of setup ``name``, or of any setup
    when ``name`` is None) created."""
    if name is None:
        filters = [{"Name": f"tag:{TAG_MANAGED}", "Values": [MANAGED_VALUE]}]
    else:
        filters = ec2_filters(name)
    if fleet:
        filters.append({"Name": f"tag:{TAG_FLEET}", "Values": [fleet]})
    else:
        filters.append({"Name": "tag-key", "Values": [TAG_FLEET]})
    return filters


# ---------------------------------------------------- times in tags (pygirder:expires)


def utcnow() -> datetime:
    return datetime.now(UTC)


def stamp(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        when = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def as_utc(value: Any) -> datetime | None:
    """A boto3 timestamp (datetime) or an ISO string as an aware UTC datetime."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return parse_time(value)
