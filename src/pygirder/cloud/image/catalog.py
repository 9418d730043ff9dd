"""The template images of a setup: list them, pick the newest for a fleet, delete them.

Images, their snapshots and kept builders are found by the setup's ownership tags
and a ``pygirder:component``; deleting goes through :mod:`pygirder.cloud.leftovers`,
the kinds ``teardown`` removes them with too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ..aws import LIVE_INSTANCE_STATES, Aws
from ..config import CloudConfig
from ..errors import ImageError
from ..leftovers import BY_KEY, terminate
from ..tags import TAG_ROLE, ec2_filters, from_tag_list, is_owned

Progress = Callable[[str], None]

BUILDER_ROLE = "image-builder"
COMPONENT_IMAGE = "image"
COMPONENT_SNAPSHOT = "image-snapshot"
COMPONENT_BUILDER = "image-builder"


def describe_image(aws: Aws, image_id: str) -> dict[str, Any] | None:
    got = aws.call(
        "ec2", "describe_images", ImageIds=[image_id],
        ignore=("InvalidAMIID.NotFound", "InvalidAMIID.Unavailable"),
    )  # fmt: skip
    images = (got or {}).get("Images", [])
    return images[0] if images else None


def snapshot_ids(image: dict[str, Any]) -> list[str]:
    return [
        m["Ebs"]["SnapshotId"]
        for m in image.get("BlockDeviceMappings", [])
        if m.get("Ebs", {}).get("SnapshotId")
    ]


def remove_image(aws: Aws, image_id: str, image: dict[str, Any] | None) -> list[str]:
    """Deregister an image, then delete its snapshots (``image``: its description, to
    know them); returns the snapshot ids.  Already gone is fine."""
    snapshots = snapshot_ids(image or {})
    BY_KEY["images"].delete(aws, [image_id])
    BY_KEY["snapshots"].delete(aws, snapshots)
    return snapshots


def image_row(image: dict[str, Any]) -> dict[str, Any]:
    return {
        "image_id": image["ImageId"],
        "name": image.get("Name", ""),
        "state": image.get("State", ""),
        "created": image.get("CreationDate", ""),
        "architecture": image.get("Architecture", ""),
        "imds_support": image.get("ImdsSupport"),
        "description": image.get("Description", ""),
        "snapshot_ids": snapshot_ids(image),
        "size_gb": sum(
            m.get("Ebs", {}).get("VolumeSize", 0) or 0 for m in image.get("BlockDeviceMappings", [])
        ),
    }


def list_images(config: CloudConfig, *, aws: Aws | None = None) -> list[dict[str, Any]]:
    """This setup's template images, newest first (see :func:`image_row` for the keys)."""
    aws = aws or Aws(config)
    got = aws.call(
        "ec2", "describe_images", Owners=["self"], Filters=ec2_filters(config.name, COMPONENT_IMAGE)
    )
    rows = [image_row(image) for image in got.get("Images", [])]
    return sorted(rows, key=lambda row: row["created"], reverse=True)


def list_builders(config: CloudConfig, *, aws: Aws | None = None) -> list[dict[str, Any]]:
    """Builders that still exist (kept with ``--keep-builder``, or a build in progress)."""
    aws = aws or Aws(config)
    filters = [
        *ec2_filters(config.name, COMPONENT_BUILDER),
        {"Name": "instance-state-name", "Values": list(LIVE_INSTANCE_STATES)},
    ]
    out = []
    for page in aws.pages("ec2", "describe_instances", Filters=filters):
        for reservation in page.get("Reservations", []):
            for inst in reservation.get("Instances", []):
                out.append(
                    {
                        "instance_id": inst["InstanceId"],
                        "state": inst["State"]["Name"],
                        "instance_type": inst.get("InstanceType", ""),
                        "launched": str(inst.get("LaunchTime", "")),
                    }
                )
    return out


def latest_image(
    config: CloudConfig, *, aws: Aws | None = None, architecture: str | None = None
) -> dict[str, Any] | None:
    """The newest available template image (of ``architecture``), or None: for fleet code."""
    for row in list_images(config, aws=aws):
        if row["state"] == "available" and architecture in (None, row["architecture"]):
            return row
    return None


def delete_images(
    config: CloudConfig,
    ids: Iterable[str],
    *,
    aws: Aws | None = None,
    progress: Progress | None = None,
) -> list[str]:
    """Deregister images and delete their snapshots; terminate kept builders (``i-...``).

    Only what carries this setup's ownership tags is touched.  Returns what was deleted.
    """
    aws = aws or Aws(config)
    say = progress or (lambda text: None)
    done = []
    for rid in ids:
        if rid.startswith("i-"):
            _delete_builder(aws, config, rid)
            say(f"terminated builder {rid}")
        else:
            snapshots = _delete_image(aws, config, rid)
            say(f"deregistered {rid}" + (f", deleted {', '.join(snapshots)}" if snapshots else ""))
        done.append(rid)
    return done


def _delete_image(aws: Aws, config: CloudConfig, image_id: str) -> list[str]:
    image = describe_image(aws, image_id)
    if image is None:
        raise ImageError(f"no image {image_id}: see `pygirder cloud image list`", code="NotFound")
    if not is_owned(from_tag_list(image.get("Tags")), config.name):
        raise ImageError(
            f"image {image_id} is not a pygirder image of setup {config.name!r}: not deleting it",
            code="NotOurs",
        )
    return remove_image(aws, image_id, image)


def _delete_builder(aws: Aws, config: CloudConfig, instance_id: str) -> None:
    got = aws.call(
        "ec2", "describe_instances", InstanceIds=[instance_id],
        ignore=("InvalidInstanceID.NotFound",),
    )  # fmt: skip
    instances = [i for r in (got or {}).get("Reservations", []) for i in r.get("Instances", [])]
    if not instances:
        raise ImageError(f"no instance {instance_id}", code="NotFound")
    tags = from_tag_list(instances[0].get("Tags"))
    if not is_owned(tags, config.name) or tags.get(TAG_ROLE) != BUILDER_ROLE:
        raise ImageError(
            f"{instance_id} is not an image builder of setup {config.name!r}: not terminating it",
            code="NotOurs",
        )
    aws.call(
        "ec2", "modify_instance_attribute", InstanceId=instance_id,
        DisableApiTermination={"Value": False},
    )  # fmt: skip
    terminate(aws, [instance_id])
