"""What fleet and image commands leave in an account, found by tag and deleted.

Instances, spot and fleet requests, launch templates, images, snapshots, volumes
and SSM parameters: teardown removes them before the account resources.
"""

from __future__ import annotations

from typing import Any

from ..aws import LIVE_INSTANCE_STATES
from ..config import CloudConfig
from ..pricing import (
    HOURS_PER_MONTH,
    PRICE_EBS_GB_MONTH,
    PRICE_INSTANCE_HOUR,
    PRICE_PUBLIC_IPV4_HOUR,
    PRICE_SNAPSHOT_GB_MONTH,
)
from ..tags import (
    TAG_COMPONENT,
    TAG_FLEET,
    TAG_ROLE,
    ec2_filters,
    from_tag_list,
    is_owned,
)
from .kind import WAIT_INSTANCE, Ctx, Kind
from .model import Found

# ----------------------------------------------------- fleet leftovers (teardown)


def _fleet_filters(ctx: Ctx) -> list[dict[str, Any]]:
    return ec2_filters(ctx.name)


class Instances(Kind):
    """Instances tagged for this setup other than the NAT: fleets, image builders."""

    key = "instances"
    title = "Instance"

    def wanted(self, config: CloudConfig) -> bool:
        return False

    def find(self, ctx: Ctx) -> list[Found]:
        reservations = ctx.describe(
            "describe_instances",
            "Reservations",
            Filters=[
                *_fleet_filters(ctx),
                {"Name": "instance-state-name", "Values": list(LIVE_INSTANCE_STATES)},
            ],
        )
        out = []
        for r in reservations:
            for inst in r.get("Instances", []):
                tags = from_tag_list(inst.get("Tags"))
                if tags.get(TAG_COMPONENT) == "nat-instance":
                    continue
                if tags.get(TAG_FLEET):
                    label = f"fleet {tags[TAG_FLEET]}"
                else:
                    label = tags.get(TAG_ROLE, "instance")
                out.append(
                    Found(id=inst["InstanceId"], name=label, state=inst["State"]["Name"], data=inst)
                )
        return out

    def delete(self, ctx: Ctx, found: Found) -> None:
        terminate_instances(ctx, [found.id])

    def monthly_usd(self, ctx: Ctx, found: Found) -> float | None:
        return instance_monthly_usd(ctx, found.data)


class FleetRequests(Kind):
    key = "ec2-fleets"
    title = "EC2 fleet"

    def wanted(self, config: CloudConfig) -> bool:
        return False

    def find(self, ctx: Ctx) -> list[Found]:
        out = []
        for page in ctx.aws.pages("ec2", "describe_fleets", Filters=_fleet_filters(ctx)):
            for fleet in page.get("Fleets", []):
                if not str(fleet.get("FleetState", "")).startswith("deleted"):
                    out.append(Found(id=fleet["FleetId"], name="fleet", state=fleet["FleetState"]))
        return out

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.delete("ec2", "delete_fleets", FleetIds=[found.id], TerminateInstances=True)


class SpotRequests(Kind):
    key = "spot-requests"
    title = "Spot request"

    def wanted(self, config: CloudConfig) -> bool:
        return False

    def find(self, ctx: Ctx) -> list[Found]:
        items = ctx.describe(
            "describe_spot_instance_requests",
            "SpotInstanceRequests",
            Filters=[*_fleet_filters(ctx), {"Name": "state", "Values": ["open", "active"]}],
        )
        return [
            Found(id=i["SpotInstanceRequestId"], name="spot request", state=i["State"])
            for i in items
        ]

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.delete("ec2", "cancel_spot_instance_requests", SpotInstanceRequestIds=[found.id])


class LaunchTemplates(Kind):
    key = "launch-templates"
    title = "Launch template"

    def wanted(self, config: CloudConfig) -> bool:
        return False

    def find(self, ctx: Ctx) -> list[Found]:
        items = ctx.describe(
            "describe_launch_templates", "LaunchTemplates", Filters=_fleet_filters(ctx)
        )
        return [Found(id=i["LaunchTemplateId"], name=i["LaunchTemplateName"]) for i in items]

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.delete("ec2", "delete_launch_template", LaunchTemplateId=found.id)


class Images(Kind):
    key = "images"
    title = "Image (AMI)"

    def wanted(self, config: CloudConfig) -> bool:
        return False

    def find(self, ctx: Ctx) -> list[Found]:
        items = ctx.ec2("describe_images", Owners=["self"], Filters=_fleet_filters(ctx))
        return [
            Found(id=i["ImageId"], name=i.get("Name", ""), state=i.get("State", ""), data=i)
            for i in items.get("Images", [])
        ]

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.delete("ec2", "deregister_image", ImageId=found.id)


class Snapshots(Kind):
    key = "snapshots"
    title = "Snapshot"

    def wanted(self, config: CloudConfig) -> bool:
        return False

    def find(self, ctx: Ctx) -> list[Found]:
        items = ctx.describe(
            "describe_snapshots", "Snapshots", OwnerIds=["self"], Filters=_fleet_filters(ctx)
        )
        return [
            Found(id=i["SnapshotId"], name="snapshot", state=i.get("State", ""), data=i)
            for i in items
        ]

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.delete("ec2", "delete_snapshot", SnapshotId=found.id)

    def monthly_usd(self, ctx: Ctx, found: Found) -> float | None:
        return found.data.get("VolumeSize", 0) * PRICE_SNAPSHOT_GB_MONTH


class Volumes(Kind):
    key = "volumes"
    title = "Detached volume"

    def wanted(self, config: CloudConfig) -> bool:
        return False

    def find(self, ctx: Ctx) -> list[Found]:
        items = ctx.describe(
            "describe_volumes",
            "Volumes",
            Filters=[*_fleet_filters(ctx), {"Name": "status", "Values": ["available"]}],
        )
        return [Found(id=i["VolumeId"], name="volume", state=i["State"], data=i) for i in items]

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.delete("ec2", "delete_volume", VolumeId=found.id)

    def monthly_usd(self, ctx: Ctx, found: Found) -> float | None:
        price = PRICE_EBS_GB_MONTH.get(found.data.get("VolumeType", "gp3"), 0.10)
        return found.data.get("Size", 0) * price


class Parameters(Kind):
    """SSM parameters below ``/pygirder/<name>/`` that pygirder wrote."""

    key = "ssm-parameters"
    title = "SSM parameter"

    def wanted(self, config: CloudConfig) -> bool:
        return False

    def find(self, ctx: Ctx) -> list[Found]:
        out = []
        for page in ctx.aws.pages(
            "ssm", "get_parameters_by_path", Path=ctx.config.ssm_prefix.rstrip("/"), Recursive=True
        ):
            for param in page.get("Parameters", []):
                tags = ctx.call(
                    "ssm",
                    "list_tags_for_resource",
                    ResourceType="Parameter",
                    ResourceId=param["Name"],
                )
                if is_owned(from_tag_list(tags.get("TagList")), ctx.name):
                    out.append(Found(id=param["Name"], name=param["Name"]))
        return out

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.delete("ssm", "delete_parameter", Name=found.id)


def terminate_instances(ctx: Ctx, ids: list[str]) -> None:
    """Terminate instances and wait (bounded) until they are gone."""
    if not ids:
        return
    ctx.delete("ec2", "terminate_instances", InstanceIds=ids)

    def terminated() -> bool:
        got = ctx.ec2("describe_instances", InstanceIds=ids, ignore=("InvalidInstanceID.NotFound",))
        states = [
            inst["State"]["Name"]
            for r in (got or {}).get("Reservations", [])
            for inst in r.get("Instances", [])
        ]
        return all(s == "terminated" for s in states)

    ctx.aws.wait_for(
        terminated,
        what=f"instances {', '.join(ids)} to terminate",
        timeout=WAIT_INSTANCE[0],
        interval=WAIT_INSTANCE[1],
    )


def instance_monthly_usd(ctx: Ctx, inst: dict[str, Any]) -> float | None:
    """What an instance costs per month in its current state (compute + IPv4 + disks)."""
    state = inst.get("State", {}).get("Name", "")
    if state in ("terminated", "shutting-down"):
        return 0.0
    volumes = [m["Ebs"]["VolumeId"] for m in inst.get("BlockDeviceMappings", []) if m.get("Ebs")]
    disks = 0.0
    if volumes:
        got = ctx.ec2("describe_volumes", VolumeIds=volumes, ignore=("InvalidVolume.NotFound",))
        for vol in (got or {}).get("Volumes", []):
            disks += vol.get("Size", 0) * PRICE_EBS_GB_MONTH.get(vol.get("VolumeType"), 0.10)
    if state in ("stopped", "stopping"):
        return disks
    hourly = PRICE_INSTANCE_HOUR.get(inst.get("InstanceType", ""))
    if hourly is None:
        return None  # unknown type: say so rather than guess
    ipv4 = PRICE_PUBLIC_IPV4_HOUR if inst.get("PublicIpAddress") else 0.0
    return (hourly + ipv4) * HOURS_PER_MONTH + disks
