"""Baking the template image: an AMI with Python, pygirder, Valkey and the boot robot.

:func:`build_image` does what ``pygirder cloud image build`` does:

1. builds the running pygirder as a wheel and uploads it under the artifact prefix
   (content-addressed, uploaded once), with a presigned URL for the builder;
2. launches an on-demand builder from the latest Amazon Linux 2023 (the public SSM
   parameter, x86_64 or arm64 by instance type) in the public subnet, with the
   instance profile, IMDSv2 required, and the bake script (``image-bake.sh``) as its
   user-data;
3. waits on the status queue for the builder's ``ready`` announcement (a ``failed``
   one carries the line that failed);
4. stops the builder, creates the image (tagged, and its snapshots too), waits until
   it is available and makes it require IMDSv2 (``ImdsSupport=v2.0``);
5. terminates the builder, or with ``keep_builder`` leaves it stopped with
   termination protection (``image delete i-...`` removes it).

Everything is tagged at creation with the setup's ownership tags and a
``pygirder:component`` (``image``, ``image-snapshot``, ``image-builder``), so
``cloud status`` shows it and ``cloud teardown`` removes it.  Instances launched from
the image run their user-data through the boot robot as the service user
``pygirder``, with pygirder in ``/opt/pygirder/bin/python3`` (the contract of
``userdata.py``).  Listing, picking and deleting images is :mod:`.catalog`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
import shlex
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ..aws import Aws
from ..config import CloudConfig
from ..errors import CloudConfigError, CloudError, ImageError
from ..instance import bake_template, boot_robot
from ..leftovers import terminate
from ..tags import (
    TAG_EXPIRES,
    TAG_ROLE,
    as_tag_list,
    from_tag_list,
    is_owned,
    ownership_tags,
)
from .catalog import (
    BUILDER_ROLE,
    COMPONENT_BUILDER,
    COMPONENT_IMAGE,
    COMPONENT_SNAPSHOT,
    Progress,
    describe_image,
    remove_image,
    snapshot_ids,
)

__all__ = ["BuildResult", "boot_robot_script", "build_image", "render_bake_script"]

SERVICE_USER = "pygirder"
DEFAULT_BUILDER_TYPE = "t3.small"
# The builder of each architecture's image: small and cheap, a few minutes of it.
BUILDER_TYPES = {"x86_64": DEFAULT_BUILDER_TYPE, "arm64": "t4g.small"}
DEFAULT_PYTHON_PACKAGE = "python3.11"
AL2023_PARAMETER = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-{arch}"
# EC2 refuses user-data over 16 KiB.
MAX_USER_DATA_BYTES = 16384
# (timeout, poll interval) in seconds.  A bake installs packages: minutes, not seconds.
WAIT_BAKE_S = 1800.0
WAIT_INSTANCE = (600.0, 5.0)
WAIT_IMAGE = (1800.0, 10.0)
_PYTHON_PACKAGE_RE = re.compile(r"python3\.\d{1,2}")


@dataclass(frozen=True)
class BuildResult:
    """What :func:`build_image` made."""

    image_id: str
    name: str
    architecture: str
    base_image_id: str
    snapshot_ids: list[str]
    imds_support: str | None
    builder_id: str
    builder_kept: bool
    build_id: str
    detail: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- the bake script ----------------------------------------------------------------------
def boot_robot_script() -> str:
    """The boot robot, as installed in the image and run by the local data plane."""
    return boot_robot().decode()


def render_bake_script(
    *,
    build_id: str,
    topic_arn: str,
    wheel_url: str,
    wheel_name: str,
    wheel_sha256: str,
    python_package: str = DEFAULT_PYTHON_PACKAGE,
    service_user: str = SERVICE_USER,
) -> str:
    """The builder's user-data: ``image-bake.sh`` with its ``@NAME@`` values filled in."""
    if not _PYTHON_PACKAGE_RE.fullmatch(python_package):
        raise CloudConfigError(
            f"--python {python_package!r} is not an Amazon Linux Python package; use e.g. "
            "'python3.11' or 'python3.12'"
        )
    if not re.fullmatch(r"[0-9a-f]{64}", wheel_sha256):
        raise ImageError(f"wheel_sha256 must be 64 lowercase hex digits, not {wheel_sha256!r}")
    values = {
        "BUILD_ID": build_id,
        "TOPIC_ARN": topic_arn,
        "WHEEL_URL": wheel_url,
        "WHEEL_NAME": wheel_name,
        "WHEEL_SHA256": wheel_sha256,
        "PYTHON_PACKAGE": python_package,
        "SERVICE_USER": service_user,
    }
    script = bake_template()
    for key, value in values.items():
        script = script.replace(f"=@{key}@\n", f"={shlex.quote(value)}\n")
    script = script.replace("\n@BOOT_ROBOT@\n", "\n" + boot_robot_script().rstrip("\n") + "\n")
    left = re.findall(r"@[A-Z_]+@", script)
    if left:
        raise ImageError(f"the bake template has unfilled values: {', '.join(sorted(left))}")
    size = len(script.encode())
    if size > MAX_USER_DATA_BYTES:
        raise ImageError(f"the bake script is {size} bytes, over EC2's {MAX_USER_DATA_BYTES}")
    return script


# -- build --------------------------------------------------------------------------------
def build_image(
    config: CloudConfig,
    *,
    aws: Aws | None = None,
    architecture: str | None = None,
    instance_type: str | None = None,
    python_package: str = DEFAULT_PYTHON_PACKAGE,
    keep_builder: bool = False,
    bake_timeout: float = WAIT_BAKE_S,
    progress: Progress | None = None,
) -> BuildResult:
    """Bake a template image for ``config``'s setup; see the module docstring.

    ``architecture`` (``x86_64``, the default, or ``arm64``) picks the builder's type
    (:data:`BUILDER_TYPES`) unless ``instance_type`` is given, whose architecture is
    then the image's.
    """
    from ..account import account_resources

    if architecture is not None and architecture not in BUILDER_TYPES:
        raise CloudConfigError(
            f"--arch {architecture!r}: images are baked for {' or '.join(BUILDER_TYPES)}"
        )
    instance_type = instance_type or BUILDER_TYPES[architecture or "x86_64"]
    aws = aws or Aws(config)
    say = progress or (lambda text: None)
    started = time.monotonic()
    found = _architecture(aws, config, instance_type)
    if architecture is not None and found != architecture:
        raise CloudConfigError(
            f"--instance-type {instance_type} is {found}, not {architecture}: give a type of "
            f"that architecture (e.g. {BUILDER_TYPES[architecture]}) or leave it out"
        )
    architecture = found
    resources_ = account_resources(config, aws=aws)
    base_image_id = _base_image(aws, architecture)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    build_id = f"image-{stamp}-{uuid.uuid4().hex[:6]}"
    version = _pygirder_version()
    name = f"pygirder-{config.name}-{version}-{architecture}-{stamp}"
    say(f"building {name} from Amazon Linux 2023 {base_image_id} on a {instance_type}")

    wheel_name, sha, url = _upload_wheel(
        aws, resources_["bucket"], resources_["artifact_prefix"], expires=bake_timeout + 900
    )
    script = render_bake_script(
        build_id=build_id, topic_arn=resources_["topic_arn"], wheel_url=url,
        wheel_name=wheel_name, wheel_sha256=sha, python_package=python_package,
    )  # fmt: skip
    builder = _launch_builder(
        aws, config, resources_, base_image_id, instance_type, script, build_id, bake_timeout
    )
    say(f"launched builder {builder}; waiting for it to bake (up to {bake_timeout / 60:.0f} min)")
    image_id: str | None = None
    try:
        detail = _await_bake(aws, resources_["queue_url"], build_id, builder, bake_timeout, say)
        say(f"baked ({detail}); stopping builder {builder}")
        aws.call("ec2", "stop_instances", InstanceIds=[builder])
        _wait_instance(aws, builder, "stopped")
        image_id = _create_image(aws, config, builder, name, base_image_id, build_id, detail)
        say(f"creating image {image_id}; waiting until it is available")
        image = _wait_image(aws, image_id)
        aws.call("ec2", "modify_image_attribute", ImageId=image_id, ImdsSupport={"Value": "v2.0"})
        snapshots = _tag_snapshots(aws, config, image, name)
        image = describe_image(aws, image_id) or image
    except BaseException:
        _clean_up_failed_build(aws, builder, image_id, keep_builder, say)
        raise
    if keep_builder:
        aws.call(
            "ec2", "modify_instance_attribute", InstanceId=builder,
            DisableApiTermination={"Value": True},
        )  # fmt: skip
        say(f"kept builder {builder} stopped, with termination protection")
    else:
        terminate(aws, [builder])
        say(f"terminated builder {builder}")
    return BuildResult(
        image_id=image_id, name=name, architecture=architecture, base_image_id=base_image_id,
        snapshot_ids=snapshots, imds_support=image.get("ImdsSupport"), builder_id=builder,
        builder_kept=keep_builder, build_id=build_id, detail=detail,
        seconds=round(time.monotonic() - started, 1),
    )  # fmt: skip


def _pygirder_version() -> str:
    try:
        return importlib.metadata.version("pygirder")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def _architecture(aws: Aws, config: CloudConfig, instance_type: str) -> str:
    try:
        types = aws.call("ec2", "describe_instance_types", InstanceTypes=[instance_type])
    except CloudError as exc:
        if exc.code == "InvalidInstanceType":
            raise CloudConfigError(
                f"--instance-type {instance_type!r} does not exist in {config.region}; "
                "use e.g. 't3.small' (x86_64) or 't4g.small' (arm64)"
            ) from exc
        raise
    offers = aws.call(
        "ec2", "describe_instance_type_offerings", LocationType="availability-zone",
        Filters=[{"Name": "instance-type", "Values": [instance_type]},
                 {"Name": "location", "Values": [config.zone]}],
    )  # fmt: skip
    if not offers.get("InstanceTypeOfferings"):
        raise CloudConfigError(
            f"--instance-type {instance_type!r} is not offered in {config.zone}; choose "
            "another type of the same architecture as your fleet"
        )
    arches = types["InstanceTypes"][0]["ProcessorInfo"]["SupportedArchitectures"]
    return "arm64" if "arm64" in arches else "x86_64"


def _base_image(aws: Aws, architecture: str) -> str:
    """The latest Amazon Linux 2023 of ``architecture``: the public SSM parameter of that
    architecture, checked against what EC2 says of the image."""
    name = AL2023_PARAMETER.format(arch=architecture)
    image_id = str(aws.call("ssm", "get_parameter", Name=name)["Parameter"]["Value"])
    image = describe_image(aws, image_id)
    if image is None:
        raise ImageError(f"{name} names {image_id}, which EC2 does not list", code="NoBaseImage")
    if image.get("Architecture", architecture) != architecture:
        raise ImageError(
            f"{name} names {image_id}, an {image['Architecture']} image, not {architecture}",
            code="NoBaseImage",
        )
    return image_id


def _upload_wheel(aws: Aws, bucket: str, prefix: str, *, expires: float) -> tuple[str, str, str]:
    """Upload the running pygirder as a wheel (once per content); returns name, sha, URL.

    The builder downloads it with a presigned URL: it has no pygirder (and may have no
    AWS tools) before the bake, and the URL grants reading that one object only.
    """
    from ..artifacts import _pygirder_wheel

    with tempfile.TemporaryDirectory(prefix="pygirder-image-") as tmp:
        wheel = _pygirder_wheel(Path(tmp))
        data = wheel.read_bytes()
        name = wheel.name
    sha = hashlib.sha256(data).hexdigest()
    key = f"{prefix}image/{sha}/{name}"
    found = aws.call("s3", "head_object", Bucket=bucket, Key=key, ignore=("404", "NoSuchKey"))
    if found is None:
        import base64

        aws.call(
            "s3", "put_object", Bucket=bucket, Key=key, Body=data,
            ContentType="application/zip", Metadata={"sha256": sha},
            ChecksumSHA256=base64.b64encode(bytes.fromhex(sha)).decode(),
        )  # fmt: skip
    url = aws.client("s3").generate_presigned_url(
        "get_object",
        Params={"Bucket": bucket, "Key": key},
        ExpiresIn=int(min(expires, 7 * 24 * 3600)),
    )
    return name, sha, url


def _launch_builder(
    aws: Aws,
    config: CloudConfig,
    resources_: dict[str, Any],
    base_image_id: str,
    instance_type: str,
    script: str,
    build_id: str,
    bake_timeout: float,
) -> str:
    expires = datetime.now(UTC) + timedelta(seconds=bake_timeout + 3600)
    tags = {
        **_tags(config, COMPONENT_BUILDER, config.resource_name("image-builder")),
        TAG_ROLE: BUILDER_ROLE,
        TAG_EXPIRES: expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    params: dict[str, Any] = {
        "ImageId": base_image_id,
        "InstanceType": instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        "SubnetId": resources_["public_subnet_id"],
        "SecurityGroupIds": [resources_["security_group_id"]],
        "IamInstanceProfile": {"Arn": resources_["instance_profile_arn"]},
        "KeyName": resources_["key_name"],
        "UserData": script,
        "MetadataOptions": {
            "HttpTokens": "required",
            "HttpEndpoint": "enabled",
            "HttpPutResponseHopLimit": 1,
        },
        "InstanceInitiatedShutdownBehavior": "stop",
        "ClientToken": f"pygirder-{build_id}",
        "TagSpecifications": [
            {"ResourceType": kind, "Tags": as_tag_list(tags)}
            for kind in ("instance", "volume", "network-interface")
        ],
    }
    disks = _root_disk(aws, base_image_id)
    if disks:
        params["BlockDeviceMappings"] = disks
    return aws.call("ec2", "run_instances", **params)["Instances"][0]["InstanceId"]


def _root_disk(aws: Aws, image_id: str) -> list[dict[str, Any]]:
    """An encrypted gp3 root volume the size of the base image's."""
    images = aws.call("ec2", "describe_images", ImageIds=[image_id]).get("Images", [])
    if not images or not images[0].get("RootDeviceName"):
        return []
    root = images[0]["RootDeviceName"]
    sizes = [
        m["Ebs"].get("VolumeSize")
        for m in images[0].get("BlockDeviceMappings", [])
        if m.get("DeviceName") == root and m.get("Ebs")
    ]
    ebs = {
        "VolumeSize": (sizes[0] if sizes and sizes[0] else 8),
        "VolumeType": "gp3",
        "Encrypted": True,
        "DeleteOnTermination": True,
    }
    return [{"DeviceName": root, "Ebs": ebs}]


def _await_bake(
    aws: Aws, queue_url: str, build_id: str, builder: str, timeout: float, say: Progress
) -> str:
    """The builder's ``ready`` detail from the status queue; raises on ``failed`` or timeout.

    Messages of other launches are made visible again at once, for whoever waits on them.
    """
    from ..instance.announce import Announcement

    deadline = time.monotonic() + timeout
    next_check = 0.0
    while (remaining := deadline - time.monotonic()) > 0:
        if time.monotonic() >= next_check:
            state = _instance_state(aws, builder)
            if state not in ("pending", "running"):
                raise ImageError(
                    f"builder {builder} is {state} before it announced the end of its bake; "
                    f"see its console output (aws ec2 get-console-output --instance-id {builder})",
                    code="BuilderGone",
                )
            next_check = time.monotonic() + 30
        got = aws.call(
            "sqs", "receive_message", QueueUrl=queue_url, MaxNumberOfMessages=10,
            WaitTimeSeconds=int(max(1, min(20, remaining))),
        )  # fmt: skip
        for message in got.get("Messages", []):
            try:
                announcement = Announcement.from_message(message["Body"])
            except (ValueError, TypeError):
                announcement = None
            if announcement is None or announcement.launch_id != build_id:
                aws.call(
                    "sqs", "change_message_visibility", QueueUrl=queue_url,
                    ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0,
                )  # fmt: skip
                continue
            aws.call(
                "sqs", "delete_message", QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"]
            )
            if announcement.event == "ready":
                return announcement.detail
            if announcement.event == "failed":
                raise ImageError(
                    f"the bake on builder {builder} failed: {announcement.detail}. Run "
                    "`pygirder cloud image build --keep-builder` to keep a failed builder "
                    "running for inspection (its log is /var/log/pygirder/bake.log)",
                    code="BakeFailed",
                )
            say(f"builder {builder}: {announcement.event} {announcement.detail}".rstrip())
    raise ImageError(
        f"builder {builder} did not finish its bake within {timeout / 60:.0f} min; see its "
        f"console output (aws ec2 get-console-output --instance-id {builder})",
        code="Timeout",
    )


def _instance_state(aws: Aws, instance_id: str) -> str:
    got = aws.call(
        "ec2", "describe_instances", InstanceIds=[instance_id],
        ignore=("InvalidInstanceID.NotFound",),
    )  # fmt: skip
    for reservation in (got or {}).get("Reservations", []):
        for inst in reservation.get("Instances", []):
            return str(inst["State"]["Name"])
    return "gone"


def _wait_instance(aws: Aws, instance_id: str, state: str) -> None:
    aws.wait_for(
        lambda: _instance_state(aws, instance_id) == state,
        what=f"instance {instance_id} to be {state}",
        timeout=WAIT_INSTANCE[0],
        interval=WAIT_INSTANCE[1],
    )


def _tags(config: CloudConfig, component: str, name: str) -> dict[str, str]:
    return {**config.tags, **ownership_tags(config.name, component), "Name": name}


def _create_image(
    aws: Aws,
    config: CloudConfig,
    builder: str,
    name: str,
    base_image_id: str,
    build_id: str,
    detail: str,
) -> str:
    """CreateImage, with the image and its snapshots tagged in the call.

    Some AWS-compatible endpoints refuse snapshot tags in CreateImage (moto answers
    HTTP 500): then the image is created with its own tags only, and
    :func:`_tag_snapshots` tags the snapshots once they exist.
    """
    from botocore.parsers import ResponseParserError

    description = f"pygirder template image ({detail}); base {base_image_id}; {build_id}"
    specs = [
        {"ResourceType": "image", "Tags": as_tag_list(_tags(config, COMPONENT_IMAGE, name))},
        {
            "ResourceType": "snapshot",
            "Tags": as_tag_list(_tags(config, COMPONENT_SNAPSHOT, name)),
        },
    ]
    params: dict[str, Any] = {"InstanceId": builder, "Name": name, "Description": description[:255]}
    try:
        return aws.call("ec2", "create_image", TagSpecifications=specs, **params)["ImageId"]
    except (CloudError, ResponseParserError) as exc:
        if isinstance(exc, CloudError) and exc.code == "InvalidAMIName.Duplicate":
            # An earlier attempt of this very call got through: converge on its image.
            found = _find_image_by_name(aws, name)
            if found is None:
                raise
            return found
        if isinstance(exc, CloudError) and (exc.status or 0) < 500 and exc.code != "NotImplemented":
            raise
    existing = _find_image_by_name(aws, name)
    if existing:
        return existing
    return aws.call("ec2", "create_image", TagSpecifications=specs[:1], **params)["ImageId"]


def _find_image_by_name(aws: Aws, name: str) -> str | None:
    got = aws.call(
        "ec2", "describe_images", Owners=["self"], Filters=[{"Name": "name", "Values": [name]}]
    )
    images = got.get("Images", [])
    return images[0]["ImageId"] if images else None


def _wait_image(aws: Aws, image_id: str) -> dict[str, Any]:
    def available() -> dict[str, Any] | None:
        image = describe_image(aws, image_id)
        if image and image.get("State") in ("failed", "error", "invalid"):
            reason = (image.get("StateReason") or {}).get("Message", "no reason given")
            raise ImageError(f"image {image_id} failed: {reason}", code="ImageFailed")
        return image if image and image.get("State") == "available" else None

    return aws.wait_for(
        available,
        what=f"image {image_id} to be available",
        timeout=WAIT_IMAGE[0],
        interval=WAIT_IMAGE[1],
    )


def _tag_snapshots(aws: Aws, config: CloudConfig, image: dict[str, Any], name: str) -> list[str]:
    """The image's snapshot ids, each made sure to carry the ownership tags."""
    ids = snapshot_ids(image)
    if not ids:
        return []
    got = aws.call("ec2", "describe_snapshots", SnapshotIds=ids)
    untagged = [
        s["SnapshotId"]
        for s in got.get("Snapshots", [])
        if not is_owned(from_tag_list(s.get("Tags")), config.name)
    ]
    if untagged:
        tags = as_tag_list(_tags(config, COMPONENT_SNAPSHOT, name))
        aws.call("ec2", "create_tags", Resources=untagged, Tags=tags)
    return ids


def _clean_up_failed_build(
    aws: Aws, builder: str, image_id: str | None, keep_builder: bool, say: Progress
) -> None:
    """After a failure: no half-made image, and no builder unless asked to keep it.

    A failure here is reported, not raised: the error that got us here matters more.
    """
    try:
        if image_id is not None:
            remove_image(aws, image_id, describe_image(aws, image_id))
            say(f"deregistered the unfinished image {image_id}")
        if keep_builder:
            say(f"kept builder {builder} for inspection: `pygirder cloud image delete {builder}`")
        else:
            terminate(aws, [builder])
            say(f"terminated builder {builder}")
    except CloudError as exc:
        say(
            f"cleaning up failed ({exc}): remove builder {builder}"
            + (f" and image {image_id}" if image_id else "")
            + " with `pygirder cloud image delete`"
        )
