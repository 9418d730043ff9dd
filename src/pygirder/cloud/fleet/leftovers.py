"""What a fleet leaves in EC2 and SSM, found by tag and deleted."""

from __future__ import annotations

from typing import Any

from ..aws import LIVE_INSTANCE_STATES, Aws
from ..tags import (
    MANAGED_VALUE,
    TAG_EXPIRES,
    TAG_FLEET,
    TAG_MANAGED,
    TAG_NAME,
    from_tag_list,
)
from .naming import as_utc, describe_instances, fleet_filters, parse_time


def terminate(aws: Aws, ids: list[str]) -> None:
    """Terminate instances, 500 per call; already gone is fine."""
    for start in range(0, len(ids), 500):
        aws.call(
            "ec2",
            "terminate_instances",
            InstanceIds=ids[start : start + 500],
            ignore=("InvalidInstanceID.NotFound",),
        )


# ------------------------------------------------------------- by kind, for down and sweep


def find_kind(aws: Aws, kind: str, name: str | None, fleet: str | None) -> list[dict[str, Any]]:
    """Fleet resources of one kind, each ``{"id", "fleet", "name", "created", "state"}``."""
    filters = fleet_filters(name, fleet)
    out: list[dict[str, Any]] = []

    def add(item_id: str, tags: Any, created: Any, state: str = "") -> None:
        t = from_tag_list(tags)
        out.append({
            "id": item_id, "fleet": t.get(TAG_FLEET, ""), "name": t.get(TAG_NAME, ""),
            "created": as_utc(created), "state": state, "expires": parse_time(t.get(TAG_EXPIRES)),
        })  # fmt: skip

    if kind == "ec2-fleets":
        for page in aws.pages("ec2", "describe_fleets", Filters=filters):
            for f in page.get("Fleets", []):
                if not str(f.get("FleetState", "")).startswith("deleted"):
                    add(f["FleetId"], f.get("Tags"), f.get("CreateTime"), f.get("FleetState", ""))
    elif kind == "spot-requests":
        got = aws.call(
            "ec2", "describe_spot_instance_requests",
            Filters=[*filters, {"Name": "state", "Values": ["open", "active"]}],
        )  # fmt: skip
        for r in got.get("SpotInstanceRequests", []):
            add(r["SpotInstanceRequestId"], r.get("Tags"), r.get("CreateTime"), r.get("State", ""))
    elif kind == "launch-templates":
        for page in aws.pages("ec2", "describe_launch_templates", Filters=filters):
            for t in page.get("LaunchTemplates", []):
                add(t["LaunchTemplateId"], t.get("Tags"), t.get("CreateTime"))
    elif kind == "volumes":
        for page in aws.pages(
            "ec2", "describe_volumes",
            Filters=[*filters, {"Name": "status", "Values": ["available"]}],
        ):  # fmt: skip
            for v in page.get("Volumes", []):
                add(v["VolumeId"], v.get("Tags"), v.get("CreateTime"), v.get("State", ""))
    elif kind == "instances":
        for inst in describe_instances(
            aws, [*filters, {"Name": "instance-state-name", "Values": list(LIVE_INSTANCE_STATES)}]
        ):
            add(inst["InstanceId"], inst.get("Tags"), inst.get("LaunchTime"), inst["State"]["Name"])
    elif kind == "parameters":
        path = f"/pygirder/{name}" if name else "/pygirder"
        for page in aws.pages("ssm", "get_parameters_by_path", Path=path, Recursive=True):
            for param in page.get("Parameters", []):
                tags = aws.call(
                    "ssm", "list_tags_for_resource", ResourceType="Parameter",
                    ResourceId=param["Name"], ignore=("InvalidResourceId",),
                )  # fmt: skip
                t = from_tag_list((tags or {}).get("TagList"))
                if t.get(TAG_MANAGED) != MANAGED_VALUE or not t.get(TAG_FLEET):
                    continue
                if (name and t.get(TAG_NAME) != name) or (fleet and t.get(TAG_FLEET) != fleet):
                    continue
                add(param["Name"], (tags or {}).get("TagList"), param.get("LastModifiedDate"))
    else:  # pragma: no cover - a programming error
        raise ValueError(kind)
    return out


# What down and sweep remove, in this order; the titles are what the proof shows.
KINDS = {
    "ec2-fleets": "EC2 fleets (active)",
    "spot-requests": "spot requests (open or active)",
    "instances": "instances (not terminated)",
    "volumes": "detached volumes",
    "launch-templates": "launch templates",
    "parameters": "SSM parameters",
}


def delete_kind(aws: Aws, kind: str, ids: list[str]) -> None:
    if not ids:
        return
    if kind == "ec2-fleets":
        for start in range(0, len(ids), 25):
            aws.call(
                "ec2", "delete_fleets", FleetIds=ids[start : start + 25], TerminateInstances=True
            )
    elif kind == "spot-requests":
        aws.call("ec2", "cancel_spot_instance_requests", SpotInstanceRequestIds=ids)
    elif kind == "instances":
        terminate(aws, ids)
    elif kind == "volumes":
        for vid in ids:
            aws.call("ec2", "delete_volume", VolumeId=vid, ignore=("InvalidVolume.NotFound",))
    elif kind == "launch-templates":
        for tid in ids:
            aws.call(
                "ec2", "delete_launch_template", LaunchTemplateId=tid,
                ignore=("InvalidLaunchTemplateId.NotFound",),
            )  # fmt: skip
    elif kind == "parameters":
        for start in range(0, len(ids), 10):
            aws.call("ssm", "delete_parameters", Names=ids[start : start + 10])


def wait_terminated(
    aws: Aws, ids: list[str], timeout: float = 600.0, interval: float = 5.0
) -> None:
    if not ids:
        return

    def gone() -> bool:
        states = []
        for start in range(0, len(ids), 500):
            got = aws.call(
                "ec2", "describe_instances", InstanceIds=ids[start : start + 500],
                ignore=("InvalidInstanceID.NotFound",),
            )  # fmt: skip
            states += [
                i["State"]["Name"]
                for r in (got or {}).get("Reservations", [])
                for i in r["Instances"]
            ]
        return all(s == "terminated" for s in states)

    aws.wait_for(
        gone, what=f"{len(ids)} instance(s) to terminate", timeout=timeout, interval=interval
    )
