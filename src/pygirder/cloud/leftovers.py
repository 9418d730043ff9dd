"""What fleet and image commands leave in an account, found by tag and deleted.

One table of kinds (:data:`KINDS`) serves every command that cleans up: ``down`` (one
fleet, or every fleet of a setup), ``sweep`` (orphans of any setup in the region) and
the account ``teardown`` (everything of a setup, image builds too).  A kind finds its
resources for a :class:`Scope` and deletes a list of ids; every delete goes through
:meth:`Aws.delete`, so "already gone" is success and a refusal while AWS still sees
dependents is retried with the one dependency policy of :mod:`.aws`.

Two rules hold for every scope: nothing without ``pygirder:managed=true`` is found,
and the NAT instance is never a leftover (the account's NAT kind owns it, and
``down`` only stops it).  It is skipped by its ``pygirder:component`` tag, not by the
absence of a fleet tag, so a teardown, which looks at every instance of a setup, and
a sweep agree.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .aws import LIVE_INSTANCE_STATES, Aws
from .errors import CloudError
from .policy import CONTROLLER_ROLE_PATTERN, ROLE_PATH
from .pricing import (
    HOURS_PER_MONTH,
    PRICE_EBS_GB_MONTH,
    PRICE_INSTANCE_HOUR,
    PRICE_PUBLIC_IPV4_HOUR,
    PRICE_SNAPSHOT_GB_MONTH,
)
from .tags import (
    MANAGED_VALUE,
    TAG_COMPONENT,
    TAG_EXPIRES,
    TAG_FLEET,
    TAG_MANAGED,
    TAG_NAME,
    TAG_ROLE,
    as_utc,
    ec2_filters,
    fleet_filters,
    from_tag_list,
    parse_time,
)

# The account's NAT instance carries this component tag; it is never a leftover.
NAT_COMPONENT = "nat-instance"
# Bounded wait for terminated instances: (timeout in seconds, poll interval).
WAIT_TERMINATED = (600.0, 5.0)

OnRetry = Callable[[CloudError, float, int], None]


@dataclass(frozen=True)
class Scope:
    """Which resources to look at.

    ``name`` is the setup (``None``: every setup in the region, for ``sweep``);
    ``fleet`` one fleet of it.  With ``fleets_only`` (``down``, ``sweep``) only what a
    fleet created counts: resources tagged ``pygirder:fleet``.  Without it
    (``teardown``) everything of the setup counts: image builders, images, snapshots.
    """

    name: str | None
    fleet: str | None = None
    fleets_only: bool = True

    @classmethod
    def setup(cls, name: str) -> Scope:
        """Everything fleet and image commands left for setup ``name``."""
        return cls(name, fleets_only=False)

    def ec2_filters(self) -> list[dict[str, Any]]:
        if self.fleets_only or self.fleet:
            return fleet_filters(self.name, self.fleet)
        assert self.name is not None  # a whole-setup scope always names its setup
        return ec2_filters(self.name)

    def ssm_path(self) -> str:
        return f"/pygirder/{self.name}" if self.name else "/pygirder"

    def owns(self, tags: dict[str, str]) -> bool:
        """The same rule as :meth:`ec2_filters`, for services that cannot filter."""
        if tags.get(TAG_MANAGED) != MANAGED_VALUE:
            return False
        if self.name is not None and tags.get(TAG_NAME) != self.name:
            return False
        if self.fleet is not None:
            return tags.get(TAG_FLEET) == self.fleet
        return bool(tags.get(TAG_FLEET)) or not self.fleets_only


@dataclass
class Leftover:
    """One resource found: its kind, id, state, tags and the raw AWS description."""

    kind: str
    id: str
    label: str
    state: str = ""
    created: datetime | None = None
    tags: dict[str, str] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def setup(self) -> str:
        return self.tags.get(TAG_NAME, "")

    @property
    def fleet(self) -> str:
        return self.tags.get(TAG_FLEET, "")

    @property
    def expires(self) -> datetime | None:
        return parse_time(self.tags.get(TAG_EXPIRES))


def _chunks(ids: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


class Kind:
    """One kind of leftover: how to find it for a scope and delete it by id."""

    key = ""
    title = ""  # one resource, in teardown and status rows: "Launch template"
    summary = ""  # the kind in down's proof: "launch templates"
    fleet = True  # a fleet leaves it (down and sweep look for it); else image commands
    service = "ec2"
    operation = ""  # the delete call, with :meth:`params` for a batch of ids
    batch = 1  # ids per delete call

    def find(self, aws: Aws, scope: Scope) -> list[Leftover]:
        raise NotImplementedError

    def delete(
        self,
        aws: Aws,
        ids: Sequence[str],
        *,
        keep_going: Callable[[], bool] = lambda: True,
        on_retry: OnRetry | None = None,
    ) -> None:
        """Delete ``ids``; already gone is fine, dependents are waited out."""
        for chunk in _chunks(ids, self.batch):
            aws.delete(
                self.service, self.operation, keep_going=keep_going, on_retry=on_retry,
                **self.params(chunk),
            )  # fmt: skip

    def params(self, ids: list[str]) -> dict[str, Any]:
        raise NotImplementedError

    def monthly_usd(self, aws: Aws, data: dict[str, Any]) -> float | None:
        """What the resource costs per month while it is left."""
        return 0.0

    def _pages(self, aws: Aws, operation: str, key: str, **params: Any) -> Iterator[dict]:
        for page in aws.pages("ec2", operation, **params):
            yield from page.get(key, [])

    def _item(
        self, item_id: str, item: dict[str, Any], *, label: str, state: str = "", created: str
    ) -> Leftover:
        return Leftover(
            self.key,
            item_id,
            label,
            state=state,
            created=as_utc(item.get(created)),
            tags=from_tag_list(item.get("Tags")),
            data=item,
        )


class FleetRequests(Kind):
    key = "ec2-fleets"
    title = "EC2 fleet"
    summary = "EC2 fleets (active)"
    batch = 25
    operation = "delete_fleets"

    def find(self, aws: Aws, scope: Scope) -> list[Leftover]:
        return [
            self._item(f["FleetId"], f, label="fleet", state=f["FleetState"], created="CreateTime")
            for f in self._pages(aws, "describe_fleets", "Fleets", Filters=scope.ec2_filters())
            if not str(f.get("FleetState", "")).startswith("deleted")
        ]

    def params(self, ids: list[str]) -> dict[str, Any]:
        return {"FleetIds": ids, "TerminateInstances": True}

    def delete(
        self,
        aws: Aws,
        ids: Sequence[str],
        *,
        keep_going: Callable[[], bool] = lambda: True,
        on_retry: OnRetry | None = None,
    ) -> None:
        """One fleet per call: a fleet whose instances are all gone already (a fleet
        controller replaced them) may be refused with InvalidParameterCombination, "No
        instances specified", after it was marked deleted; the others must not wait
        on it."""
        for fleet_id in ids:
            try:
                super().delete(aws, [fleet_id], keep_going=keep_going, on_retry=on_retry)
            except CloudError as exc:
                if exc.code != "InvalidParameterCombination":
                    raise


class SpotRequests(Kind):
    key = "spot-requests"
    title = "Spot request"
    summary = "spot requests (open or active)"
    batch = 100
    operation = "cancel_spot_instance_requests"

    def find(self, aws: Aws, scope: Scope) -> list[Leftover]:
        filters = [*scope.ec2_filters(), {"Name": "state", "Values": ["open", "active"]}]
        items = self._pages(
            aws, "describe_spot_instance_requests", "SpotInstanceRequests", Filters=filters
        )
        return [
            self._item(
                r["SpotInstanceRequestId"],
                r,
                label="spot request",
                state=r.get("State", ""),
                created="CreateTime",
            )
            for r in items
        ]

    def params(self, ids: list[str]) -> dict[str, Any]:
        return {"SpotInstanceRequestIds": ids}


class Instances(Kind):
    """Live instances (fleet members, image builders), never the NAT instance."""

    key = "instances"
    title = "Instance"
    summary = "instances (not terminated)"
    batch = 500
    operation = "terminate_instances"

    def find(self, aws: Aws, scope: Scope) -> list[Leftover]:
        filters = [
            *scope.ec2_filters(),
            {"Name": "instance-state-name", "Values": list(LIVE_INSTANCE_STATES)},
        ]
        out = []
        for reservation in self._pages(aws, "describe_instances", "Reservations", Filters=filters):
            for inst in reservation.get("Instances", []):
                tags = from_tag_list(inst.get("Tags"))
                if tags.get(TAG_COMPONENT) == NAT_COMPONENT:
                    continue
                label = f"fleet {tags[TAG_FLEET]}" if tags.get(TAG_FLEET) else None
                out.append(
                    self._item(
                        inst["InstanceId"],
                        inst,
                        label=label or tags.get(TAG_ROLE, "instance"),
                        state=inst["State"]["Name"],
                        created="LaunchTime",
                    )
                )
        return out

    def params(self, ids: list[str]) -> dict[str, Any]:
        return {"InstanceIds": ids}

    def monthly_usd(self, aws: Aws, data: dict[str, Any]) -> float | None:
        return instance_monthly_usd(aws, data)


class LaunchTemplates(Kind):
    key = "launch-templates"
    title = "Launch template"
    summary = "launch templates"
    operation = "delete_launch_template"

    def find(self, aws: Aws, scope: Scope) -> list[Leftover]:
        items = self._pages(
            aws, "describe_launch_templates", "LaunchTemplates", Filters=scope.ec2_filters()
        )
        return [
            self._item(
                t["LaunchTemplateId"], t, label=t["LaunchTemplateName"], created="CreateTime"
            )
            for t in items
        ]

    def params(self, ids: list[str]) -> dict[str, Any]:
        return {"LaunchTemplateId": ids[0]}


class Images(Kind):
    key = "images"
    title = "Image (AMI)"
    summary = "images"
    fleet = False
    operation = "deregister_image"

    def find(self, aws: Aws, scope: Scope) -> list[Leftover]:
        got = aws.call("ec2", "describe_images", Owners=["self"], Filters=scope.ec2_filters())
        return [
            self._item(
                i["ImageId"],
                i,
                label=i.get("Name", ""),
                state=i.get("State", ""),
                created="CreationDate",
            )
            for i in got.get("Images", [])
        ]

    def params(self, ids: list[str]) -> dict[str, Any]:
        return {"ImageId": ids[0]}


class Snapshots(Kind):
    key = "snapshots"
    title = "Snapshot"
    summary = "snapshots"
    fleet = False
    operation = "delete_snapshot"

    def find(self, aws: Aws, scope: Scope) -> list[Leftover]:
        items = self._pages(
            aws, "describe_snapshots", "Snapshots", OwnerIds=["self"], Filters=scope.ec2_filters()
        )
        return [
            self._item(
                s["SnapshotId"],
                s,
                label="snapshot",
                state=s.get("State", ""),
                created="StartTime",
            )
            for s in items
        ]

    def params(self, ids: list[str]) -> dict[str, Any]:
        return {"SnapshotId": ids[0]}

    def monthly_usd(self, aws: Aws, data: dict[str, Any]) -> float | None:
        return data.get("VolumeSize", 0) * PRICE_SNAPSHOT_GB_MONTH


class Volumes(Kind):
    key = "volumes"
    title = "Detached volume"
    summary = "detached volumes"
    operation = "delete_volume"

    def find(self, aws: Aws, scope: Scope) -> list[Leftover]:
        filters = [*scope.ec2_filters(), {"Name": "status", "Values": ["available"]}]
        return [
            self._item(
                v["VolumeId"], v, label="volume", state=v.get("State", ""), created="CreateTime"
            )
            for v in self._pages(aws, "describe_volumes", "Volumes", Filters=filters)
        ]

    def params(self, ids: list[str]) -> dict[str, Any]:
        return {"VolumeId": ids[0]}

    def monthly_usd(self, aws: Aws, data: dict[str, Any]) -> float | None:
        return data.get("Size", 0) * PRICE_EBS_GB_MONTH.get(data.get("VolumeType", "gp3"), 0.10)


class Parameters(Kind):
    """SSM parameters below ``/pygirder/<name>/``, owned by tag (SSM cannot filter by
    tag on a path query, so each parameter's tags are asked)."""

    key = "ssm-parameters"
    title = "SSM parameter"
    summary = "SSM parameters"
    batch = 10
    service = "ssm"
    operation = "delete_parameters"

    def find(self, aws: Aws, scope: Scope) -> list[Leftover]:
        out = []
        path = scope.ssm_path()
        for page in aws.pages("ssm", "get_parameters_by_path", Path=path, Recursive=True):
            for param in page.get("Parameters", []):
                got = aws.call(
                    "ssm", "list_tags_for_resource", ResourceType="Parameter",
                    ResourceId=param["Name"], ignore=("InvalidResourceId",),
                )  # fmt: skip
                tags = from_tag_list((got or {}).get("TagList"))
                if scope.owns(tags):
                    item = {**param, "Tags": (got or {}).get("TagList", [])}
                    out.append(
                        self._item(
                            param["Name"], item, label=param["Name"], created="LastModifiedDate"
                        )
                    )
        return out

    def params(self, ids: list[str]) -> dict[str, Any]:
        return {"Names": ids}


class ControllerRoles(Kind):
    """The instance role and profile of a fleet's controller (one name for both,
    :data:`pygirder.cloud.policy.CONTROLLER_ROLE_PATTERN`, below ``/pygirder/``).  IAM
    cannot filter by tag, so each role's tags are asked.  Removed after the instances
    that used it."""

    key = "controller-roles"
    title = "Controller role"
    summary = "controller roles and instance profiles"
    service = "iam"

    def find(self, aws: Aws, scope: Scope) -> list[Leftover]:
        out = []
        for page in aws.pages("iam", "list_roles", token="Marker", PathPrefix=ROLE_PATH):
            for role in page.get("Roles", []):
                name = role["RoleName"]
                if not fnmatch.fnmatchcase(name, CONTROLLER_ROLE_PATTERN):
                    continue
                got = aws.call("iam", "list_role_tags", RoleName=name, ignore=("NoSuchEntity",))
                item = {**role, "Tags": (got or {}).get("Tags", [])}
                tags = from_tag_list(item["Tags"])
                # A fleet's, never a setup's own instance role (even one whose setup
                # name ends in "-fleet").
                if got is not None and tags.get(TAG_FLEET) and scope.owns(tags):
                    out.append(self._item(name, item, label=name, created="CreateDate"))
        return out

    def delete(
        self,
        aws: Aws,
        ids: Sequence[str],
        *,
        keep_going: Callable[[], bool] = lambda: True,
        on_retry: OnRetry | None = None,
    ) -> None:
        """Profile (emptied first), inline policies, role; already gone is fine."""
        kw: dict[str, Any] = {"keep_going": keep_going, "on_retry": on_retry}
        for name in ids:
            got = aws.call(
                "iam", "get_instance_profile", InstanceProfileName=name, ignore=("NoSuchEntity",)
            )
            for role in (got or {}).get("InstanceProfile", {}).get("Roles", []):
                aws.delete(
                    "iam", "remove_role_from_instance_profile", InstanceProfileName=name,
                    RoleName=role["RoleName"], **kw,
                )  # fmt: skip
            if got is not None:
                aws.delete("iam", "delete_instance_profile", InstanceProfileName=name, **kw)
            listed = aws.call("iam", "list_role_policies", RoleName=name, ignore=("NoSuchEntity",))
            for policy_name in (listed or {}).get("PolicyNames", []):
                aws.delete("iam", "delete_role_policy", RoleName=name, PolicyName=policy_name, **kw)
            aws.delete("iam", "delete_role", RoleName=name, **kw)


# Every kind, in the order they are removed: EC2 fleets and spot requests before their
# instances (or they launch replacements), images before their snapshots.
KINDS: tuple[Kind, ...] = (
    FleetRequests(),
    SpotRequests(),
    Instances(),
    LaunchTemplates(),
    Images(),
    Snapshots(),
    Volumes(),
    Parameters(),
    ControllerRoles(),
)
FLEET_KINDS: tuple[Kind, ...] = tuple(k for k in KINDS if k.fleet)
BY_KEY: dict[str, Kind] = {k.key: k for k in KINDS}
INSTANCES = BY_KEY["instances"]


def find(aws: Aws, scope: Scope, kinds: Sequence[Kind] | None = None) -> dict[str, list[Leftover]]:
    """Kind key -> what of it ``scope`` holds (default kinds: what the scope counts)."""
    if kinds is None:
        kinds = FLEET_KINDS if scope.fleets_only else KINDS
    return {kind.key: kind.find(aws, scope) for kind in kinds}


# ------------------------------------------------------------------ instances


def terminate(aws: Aws, ids: Sequence[str], *, on_retry: OnRetry | None = None) -> None:
    """Terminate instances, 500 per call; already gone is fine."""
    INSTANCES.delete(aws, ids, on_retry=on_retry)


def wait_terminated(
    aws: Aws,
    ids: Sequence[str],
    timeout: float = WAIT_TERMINATED[0],
    interval: float = WAIT_TERMINATED[1],
) -> None:
    """Wait (bounded) until every instance of ``ids`` is terminated or gone."""
    if not ids:
        return

    def gone() -> bool:
        states = []
        for chunk in _chunks(ids, 500):
            got = aws.call(
                "ec2", "describe_instances", InstanceIds=chunk,
                ignore=("InvalidInstanceID.NotFound",),
            )  # fmt: skip
            states += [
                i["State"]["Name"]
                for r in (got or {}).get("Reservations", [])
                for i in r.get("Instances", [])
            ]
        return all(s == "terminated" for s in states)

    aws.wait_for(
        gone, what=f"{len(ids)} instance(s) to terminate", timeout=timeout, interval=interval
    )


def instance_monthly_usd(aws: Aws, inst: dict[str, Any]) -> float | None:
    """What an instance costs per month in its current state (compute + IPv4 + disks)."""
    state = inst.get("State", {}).get("Name", "")
    if state in ("terminated", "shutting-down"):
        return 0.0
    volumes = [m["Ebs"]["VolumeId"] for m in inst.get("BlockDeviceMappings", []) if m.get("Ebs")]
    disks = 0.0
    if volumes:
        got = aws.call(
            "ec2", "describe_volumes", VolumeIds=volumes, ignore=("InvalidVolume.NotFound",)
        )
        for vol in (got or {}).get("Volumes", []):
            disks += vol.get("Size", 0) * PRICE_EBS_GB_MONTH.get(vol.get("VolumeType"), 0.10)
    if state in ("stopped", "stopping"):
        return disks
    hourly = PRICE_INSTANCE_HOUR.get(inst.get("InstanceType", ""))
    if hourly is None:
        return None  # unknown type: say so rather than guess
    ipv4 = PRICE_PUBLIC_IPV4_HOUR if inst.get("PublicIpAddress") else 0.0
    return (hourly + ipv4) * HOURS_PER_MONTH + disks
