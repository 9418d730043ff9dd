"""What a fleet boots: per role, the newest template image of the architecture of its
instance types, and the artifact to install."""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from collections.abc import Sequence

from ..aws import Aws
from ..config import CloudConfig
from ..errors import CloudConfigError, CloudError, FleetError
from ..tags import ec2_filters

# ------------------------------------------------------------ image and artifact

# The architectures a template image is baked for (``pygirder cloud image build --arch``).
ARCHITECTURES = ("x86_64", "arm64")


def type_architectures(aws: Aws, types: Sequence[str]) -> dict[str, str]:
    """Instance type -> the architecture its image must have (``x86_64`` or ``arm64``),
    as DescribeInstanceTypes says; an unknown type is a configuration error."""
    wanted = sorted(set(types))
    out: dict[str, str] = {}
    for start in range(0, len(wanted), 100):  # DescribeInstanceTypes takes 100 at most
        chunk = wanted[start : start + 100]
        try:
            got = aws.call("ec2", "describe_instance_types", InstanceTypes=chunk)
        except CloudError as exc:
            if exc.code == "InvalidInstanceType":
                raise CloudConfigError(
                    f"instance type(s) {', '.join(chunk)}: {exc}; check their spelling and "
                    f"that {aws.region} offers them"
                ) from exc
            raise
        for item in got.get("InstanceTypes", []):
            arches = item.get("ProcessorInfo", {}).get("SupportedArchitectures", [])
            out[item["InstanceType"]] = "arm64" if "arm64" in arches else "x86_64"
    missing = [t for t in wanted if t not in out]
    if missing:
        raise CloudConfigError(f"EC2 does not know the instance type(s) {', '.join(missing)}")
    return out


def role_architecture(aws: Aws, what: str, types: Sequence[str]) -> str:
    """The one architecture of a role's instance types: one launch template, one image."""
    arches = type_architectures(aws, types)
    found = sorted(set(arches.values()))
    if len(found) > 1:
        by = "; ".join(f"{a}: {', '.join(t for t in types if arches[t] == a)}" for a in found)
        raise CloudConfigError(
            f"the {what} types mix architectures ({by}); one role boots one image, so "
            "choose types of one architecture"
        )
    return found[0]


def find_image(config: CloudConfig, *, aws: Aws, architecture: str | None = None) -> str:
    """The newest available template image of this setup (of ``architecture``)."""
    try:
        from ..image import latest_image
    except ImportError:  # the image command is not installed: look by tag
        got = aws.call(
            "ec2",
            "describe_images",
            Owners=["self"],
            Filters=[
                *ec2_filters(config.name, "image"),
                {"Name": "state", "Values": ["available"]},
                *([{"Name": "architecture", "Values": [architecture]}] if architecture else []),
            ],
        )
        images = sorted(got.get("Images", []), key=lambda i: i.get("CreationDate", ""))
        found = images[-1]["ImageId"] if images else None
    else:
        row = latest_image(config, aws=aws, architecture=architecture)
        found = row["image_id"] if row else None
    if not found:
        arch = f" for {architecture}" if architecture else ""
        flag = f" --arch {architecture}" if architecture else ""
        raise FleetError(
            f"no pygirder image{arch} of {config.name!r} in {config.region}: build one with "
            f"`pygirder cloud image build{flag}`, or pass --image AMI_ID",
            code="NoImage",
        )
    return found


def images_for(
    config: CloudConfig,
    *,
    aws: Aws,
    roles: dict[str, tuple[str, ...]],
    given: Sequence[str] = (),
) -> dict[str, str]:
    """Role -> the AMI its launch template boots, matching the architecture of the
    role's instance types (``roles``: role -> types).

    ``given`` are AMIs the operator chose (``--image``, one per architecture); an
    architecture without one gets the newest image baked for it.  A role whose
    architecture has no image is an error that names the command baking one.
    """
    chosen: dict[str, str] = {}
    for image_id in given:
        got = aws.call(
            "ec2", "describe_images", ImageIds=[image_id],
            ignore=("InvalidAMIID.NotFound", "InvalidAMIID.Malformed"),
        )  # fmt: skip
        images = (got or {}).get("Images", [])
        if not images:
            raise CloudConfigError(f"--image {image_id}: no such image in {config.region}")
        arch = images[0].get("Architecture", "x86_64")
        if arch in chosen and chosen[arch] != image_id:
            raise CloudConfigError(
                f"--image {chosen[arch]} and {image_id} are both {arch}: give one per architecture"
            )
        chosen[arch] = image_id
    out: dict[str, str] = {}
    for role, types in roles.items():
        arch = role_architecture(aws, role, types)
        if arch not in chosen:
            try:
                chosen[arch] = find_image(config, aws=aws, architecture=arch)
            except FleetError as exc:
                setting = (
                    "set redis_instance_type (or --redis-type) to a type of an architecture "
                    "you have an image for"
                    if role == "redis"
                    else "choose --instance-types of an architecture you have an image for"
                )
                raise FleetError(
                    f"the {role} type(s) {', '.join(types)} are {arch}, and {exc}; or " + setting,
                    code="NoImage",
                ) from exc
        out[role] = chosen[arch]
    return out


def resolve_artifact(bucket: str, prefix: str, wanted: str | None) -> tuple[str, str, list[str]]:
    """(URI, SHA-256, top-level modules) of the artifact to run: ``wanted`` (a URI or a
    SHA-256 prefix) or the newest pushed one."""
    from ..artifacts import download_artifact, list_artifacts

    found = list_artifacts(bucket, prefix)
    if wanted and wanted.startswith("s3://"):
        chosen = [a for a in found if a["uri"] == wanted]
    elif wanted:
        chosen = [a for a in found if a["sha256"].startswith(wanted.lower())]
    else:
        chosen = found[:1]
    if not chosen:
        what = f"artifact {wanted!r}" if wanted else "artifact"
        raise FleetError(
            f"no {what} in s3://{bucket}/{prefix}: push the project with "
            "`pygirder cloud artifact push`",
            code="NoArtifact",
        )
    if len(chosen) > 1:
        raise FleetError(f"--artifact {wanted!r} matches {len(chosen)} artifacts; give more of it")
    uri, sha = chosen[0]["uri"], chosen[0]["sha256"]
    with tempfile.TemporaryDirectory(prefix="pygirder-manifest-") as tmp:
        bundle = download_artifact(uri, sha, tmp)
        with tarfile.open(bundle, "r:gz") as tar:
            member = tar.extractfile("manifest.json")
            manifest = json.load(io.TextIOWrapper(member)) if member else {}
    return uri, sha, list(manifest.get("modules", []))
