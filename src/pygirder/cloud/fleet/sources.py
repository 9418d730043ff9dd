"""What a fleet boots: the newest template image and the artifact to install."""

from __future__ import annotations

import io
import json
import tarfile
import tempfile

from ..aws import Aws
from ..config import CloudConfig
from ..errors import FleetError
from ..tags import (
    ec2_filters,
)

# ------------------------------------------------------------ image and artifact


def find_image(config: CloudConfig, *, aws: Aws) -> str:
    """The newest available template image of this setup (``pygirder cloud image build``)."""
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
            ],
        )
        images = sorted(got.get("Images", []), key=lambda i: i.get("CreationDate", ""))
        found = images[-1]["ImageId"] if images else None
    else:
        row = latest_image(config, aws=aws)
        found = row["image_id"] if row else None
    if not found:
        raise FleetError(
            f"no pygirder image of {config.name!r} in {config.region}: build one with "
            "`pygirder cloud image build`, or pass --image AMI_ID",
            code="NoImage",
        )
    return found


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
