"""The ``[cloud]`` table of ``pygirder.toml``: typed, validated, and the names it implies.

``load_config()`` finds the file (``--config``, then ``$PYGIRDER_CONFIG``, then
``./pygirder.toml``), validates ``[cloud]`` with pydantic and returns a frozen
:class:`CloudConfig`.  Every invalid value fails with a :class:`CloudConfigError`
naming the key, the value and what is allowed.  AWS credentials never appear here:
they come from the standard boto3 chain (profile, SSO, environment).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from .errors import CloudConfigError
from .tags import RESERVED_PREFIXES

CONFIG_ENV = "PYGIRDER_CONFIG"
CONFIG_FILENAME = "pygirder.toml"
SECTION = "cloud"

_NAME_RE = re.compile(r"^[a-z](?:[a-z0-9-]{0,18}[a-z0-9])?$")
_REGION_RE = re.compile(r"^[a-z]{2}(?:-[a-z]+)+-\d+$")
_ZONE_SUFFIX_RE = re.compile(r"^(?:[a-z]|(?:-[a-z0-9]+)+[a-z]?)$")
_INSTANCE_TYPE_RE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$")
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
# Where fleets keep their durable results in the bucket (the instance role may write
# there and nowhere else; a lifecycle rule expires them after result_retention_days).
RESULT_PREFIX = "results/"
_PREFIX_RE = re.compile(r"^[A-Za-z0-9!_.*'()-]+(?:/[A-Za-z0-9!_.*'()-]+)*/$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

EXAMPLE_SSH_FROM = "203.0.113.7/32"
# The public key imported for SSH unless public_key_file says otherwise; when it does
# not exist, setup creates pygirder's own key pair (as Ray and SkyPilot do).
DEFAULT_PUBLIC_KEY = Path("~/.ssh/id_ed25519.pub")
PYGIRDER_KEY = Path("~/.pygirder/keys/pygirder-ed25519")
# ssh_from may be at most this wide (a /16: 65,536 addresses) unless
# allow_ssh_from_anywhere is set.
WIDEST_SSH_PREFIX = 16


class CloudConfig(BaseModel):
    """Validated ``[cloud]`` settings.  Build it with :func:`load_config`."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    name: str = "default"
    """Names every resource (``pygirder-<name>-...``) and is the ``pygirder:name`` tag."""
    region: str = "us-east-1"
    zone: str = ""
    """Availability zone of both subnets; empty means ``<region>a``."""
    profile: str | None = None
    """AWS profile; ``None`` uses the standard boto3 chain (env, SSO, default profile)."""

    vpc_cidr: str = "10.42.0.0/16"
    public_subnet_cidr: str = "10.42.0.0/20"
    private_subnet_cidr: str = "10.42.128.0/17"
    allow_ssh_from_anywhere: bool = False
    """Must be true for an ``ssh_from`` wider than a /16, such as ``"0.0.0.0/0"`` (and
    then pygirder warns)."""
    ssh_from: str = ""
    """CIDR allowed to SSH into the cluster; empty until the user fills it in."""

    nat: Literal["instance", "gateway"] = "instance"
    nat_instance_type: str = "t4g.nano"
    redis_market: Literal["on-demand", "spot"] = "on-demand"
    """Capacity of a fleet's redis node: its loss loses the grid, so on-demand by default."""
    redis_instance_type: str = "m7g.medium"
    """Type of a fleet's redis node: a small Graviton (arm64) type with steady CPU, which
    needs an arm64 image (``pygirder cloud image build --arch arm64``)."""

    public_key_file: Path = DEFAULT_PUBLIC_KEY
    """Imported as the key pair instances accept; when this default does not exist,
    pygirder's own key (``~/.pygirder/keys/pygirder-ed25519.pub``) is used, and setup
    creates it."""
    cluster_key_file: Path | None = None
    """Private intra-cluster key written with mode 0600; ``None`` means
    ``~/.pygirder/keys/pygirder-<name>-cluster.pem``."""

    bucket: str | None = None
    """Artifact bucket; ``None`` means ``pygirder-<name>-<account id>-<region>``."""
    artifact_prefix: str = "artifacts/"
    artifact_retention_days: int = Field(default=30, ge=1, le=3650)
    result_retention_days: int = Field(default=30, ge=1, le=3650)
    """Days the fleet's durable results (``results/`` in the bucket) are kept."""

    alarm_thresholds_usd: tuple[float, ...] = (1.0, 10.0, 100.0)
    budget_usd: float = Field(default=25.0, gt=0, le=1_000_000)
    alert_email: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)

    # ----------------------------------------------------------------- validation

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(
                "must be 1-20 characters of lowercase letters, digits and '-', starting "
                "with a letter and not ending with '-' (it becomes part of bucket names)"
            )
        return value

    @field_validator("region")
    @classmethod
    def _check_region(cls, value: str) -> str:
        if not _REGION_RE.match(value):
            raise ValueError("must be an AWS region code such as 'us-east-1' or 'eu-west-2'")
        return value

    @field_validator("profile", "alert_email", "bucket", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("zone")
    @classmethod
    def _check_zone(cls, value: str, info: ValidationInfo) -> str:
        region = info.data.get("region")
        if region is None:  # the region itself is invalid and reported
            return value
        zone = value or f"{region}a"
        if not zone.startswith(region) or not _ZONE_SUFFIX_RE.match(zone[len(region) :]):
            raise ValueError(f"is not a zone of region {region!r}; use e.g. '{region}a'")
        return zone

    @field_validator("vpc_cidr", "public_subnet_cidr", "private_subnet_cidr")
    @classmethod
    def _check_network(cls, value: str, info: ValidationInfo) -> str:
        net = _ipv4_network(value)
        if not 16 <= net.prefixlen <= 28:
            raise ValueError("AWS allows VPC and subnet blocks between /16 and /28")
        if not net.is_private:
            raise ValueError("use a private range (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16)")
        vpc = info.data.get("vpc_cidr")
        if info.field_name != "vpc_cidr" and vpc is not None:
            if not net.subnet_of(ipaddress.IPv4Network(vpc)):
                raise ValueError(f"is not inside vpc_cidr {vpc}")
            public = info.data.get("public_subnet_cidr")
            if (
                info.field_name == "private_subnet_cidr"
                and public is not None
                and net.overlaps(ipaddress.IPv4Network(public))
            ):
                raise ValueError(f"overlaps public_subnet_cidr {public}")
        return str(net)

    @field_validator("ssh_from")
    @classmethod
    def _check_ssh_from(cls, value: str, info: ValidationInfo) -> str:
        value = value.strip()
        if not value:
            return ""
        if "/" not in value:
            value += "/32"  # a bare address means exactly that address
        net = _ipv4_network(value)
        if net.prefixlen < WIDEST_SSH_PREFIX and not info.data.get("allow_ssh_from_anywhere"):
            reach = (
                "the whole internet"
                if net.prefixlen == 0
                else f"{net.num_addresses:,} addresses (wider than a /{WIDEST_SSH_PREFIX})"
            )
            raise ValueError(
                f"opens SSH to {reach}; set it to your own address "
                f"(e.g. '{EXAMPLE_SSH_FROM}') or your network (at most a "
                f"/{WIDEST_SSH_PREFIX}), or also set allow_ssh_from_anywhere = true if you "
                "really mean it"
            )
        return str(net)

    @field_validator("nat_instance_type", "redis_instance_type")
    @classmethod
    def _check_instance_type(cls, value: str) -> str:
        if not _INSTANCE_TYPE_RE.match(value):
            raise ValueError("must be an EC2 instance type such as 't4g.nano' or 't3.micro'")
        return value

    @field_validator("bucket")
    @classmethod
    def _check_bucket(cls, value: str | None) -> str | None:
        if value is not None and (not _BUCKET_RE.match(value) or ".." in value):
            raise ValueError(
                "must be a valid S3 bucket name: 3-63 lowercase letters, digits, '.' and '-'"
            )
        return value

    @field_validator("artifact_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not _PREFIX_RE.match(value):
            raise ValueError(
                "must be a relative S3 key prefix ending with '/', such as 'artifacts/'"
            )
        if value.startswith(RESULT_PREFIX) or RESULT_PREFIX.startswith(value):
            raise ValueError(f"must not overlap {RESULT_PREFIX!r}, where fleets keep results")
        return value

    @field_validator("alarm_thresholds_usd", mode="before")
    @classmethod
    def _check_thresholds(cls, value: Any) -> Any:
        if not isinstance(value, list | tuple):
            raise ValueError("must be a list of amounts in USD, such as [1, 10, 100]")
        if not 1 <= len(value) <= 10:
            raise ValueError("must hold between 1 and 10 amounts")
        try:
            amounts = [float(v) for v in value]
        except (TypeError, ValueError):
            raise ValueError("must be a list of numbers (USD)") from None
        if any(a <= 0 for a in amounts):
            raise ValueError("every amount must be greater than 0")
        if len(set(amounts)) != len(amounts):
            raise ValueError("amounts must be distinct")
        return tuple(sorted(amounts))

    @field_validator("alert_email")
    @classmethod
    def _check_email(cls, value: str | None) -> str | None:
        if value is not None and not _EMAIL_RE.match(value):
            raise ValueError("must be an e-mail address such as 'ops@example.com'")
        return value

    @field_validator("tags")
    @classmethod
    def _check_tags(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > 40:
            raise ValueError("at most 40 tags (AWS allows 50; pygirder uses up to 5)")
        for key, tag_value in value.items():
            if not 1 <= len(key) <= 128:
                raise ValueError(f"tag key {key!r} must be 1-128 characters")
            if key.lower().startswith(RESERVED_PREFIXES):
                raise ValueError(
                    f"tag key {key!r} uses a reserved prefix ({', '.join(RESERVED_PREFIXES)})"
                )
            if len(tag_value) > 256:
                raise ValueError(f"tag {key!r}: value must be at most 256 characters")
        return value

    # ------------------------------------------------------------------- names

    def resource_name(self, kind: str) -> str:
        """``pygirder-<name>-<kind>``: the name of one account-level resource."""
        return f"pygirder-{self.name}-{kind}"

    def bucket_name(self, account_id: str) -> str:
        """The artifact bucket: ``bucket`` if set, else unique per account and region."""
        return self.bucket or f"pygirder-{self.name}-{account_id}-{self.region}"

    @property
    def ssm_prefix(self) -> str:
        """SSM parameter path of this setup; the instance role may read only below it."""
        return f"/pygirder/{self.name}/"

    @property
    def public_key_path(self) -> Path:
        """The public key the instances accept: ``public_key_file``, or pygirder's own
        key pair when that is the default and you have no such key."""
        path = self.public_key_file.expanduser()
        if self.uses_pygirder_key:
            return self.pygirder_key_path.with_name(self.pygirder_key_path.name + ".pub")
        return path

    @property
    def uses_pygirder_key(self) -> bool:
        """True when SSH uses pygirder's own key pair: ``public_key_file`` is the default
        ``~/.ssh/id_ed25519.pub`` and that file does not exist."""
        path = self.public_key_file.expanduser()
        return path == DEFAULT_PUBLIC_KEY.expanduser() and not path.exists()

    @property
    def pygirder_key_path(self) -> Path:
        """The private half of pygirder's own key pair (mode 0600)."""
        return PYGIRDER_KEY.expanduser()

    @property
    def cluster_key_path(self) -> Path:
        path = self.cluster_key_file or Path(f"~/.pygirder/keys/pygirder-{self.name}-cluster.pem")
        return path.expanduser()

    @property
    def warnings(self) -> list[str]:
        """Things that are allowed but that the user should hear about every time."""
        out = []
        if self.ssh_from == "0.0.0.0/0":
            out.append(
                "SSH is open to the whole internet (ssh_from = '0.0.0.0/0', "
                "allow_ssh_from_anywhere = true); anyone can try to log in."
            )
        elif self.ssh_from:
            net = ipaddress.IPv4Network(self.ssh_from)
            if net.prefixlen < WIDEST_SSH_PREFIX:
                out.append(
                    f"SSH is open to {net.num_addresses:,} addresses (ssh_from = "
                    f"'{self.ssh_from}', allow_ssh_from_anywhere = true)."
                )
        return out

    def require_ssh_source(self) -> str:
        """The SSH source CIDR, or a clear error while it is still unset."""
        if not self.ssh_from:
            raise CloudConfigError(
                f"[{SECTION}] ssh_from is not set: pygirder opens SSH only to the address "
                f"you choose. Set it to your public address as a CIDR, e.g. "
                f'ssh_from = "{EXAMPLE_SSH_FROM}" (or run `pygirder cloud init '
                f"--ssh-from CIDR --force`).",
                problems=[("ssh_from", "", f"a CIDR block such as '{EXAMPLE_SSH_FROM}'")],
            )
        return self.ssh_from


def _ipv4_network(value: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            fixed = ipaddress.ip_network(value, strict=False)
            raise ValueError(f"has host bits set; did you mean '{fixed}'?") from None
        raise ValueError(f"is not a CIDR block; expected e.g. '{EXAMPLE_SSH_FROM}'") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise ValueError("must be an IPv4 CIDR block (the VPC is IPv4-only)")
    return net


# ---------------------------------------------------------------------- loading


def config_path(path: str | os.PathLike[str] | None = None) -> Path:
    """Where the config lives: ``path``, else ``$PYGIRDER_CONFIG``, else ./pygirder.toml."""
    if path:
        return Path(path).expanduser()
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env).expanduser()
    return Path.cwd() / CONFIG_FILENAME


def load_config(path: str | os.PathLike[str] | None = None) -> CloudConfig:
    """Read and validate ``[cloud]`` of ``pygirder.toml``.

    Relative key-file paths are relative to the file's directory.  Raises
    :class:`CloudConfigError` when the file or the table is missing or invalid.
    """
    file = config_path(path)
    if not file.is_file():
        raise CloudConfigError(
            f"no config file at {file}; create one with `pygirder cloud init` "
            f"(or point --config / ${CONFIG_ENV} at it)"
        )
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CloudConfigError(f"{file} is not valid TOML: {exc}") from None
    section = data.get(SECTION)
    if section is None:
        raise CloudConfigError(
            f"{file} has no [{SECTION}] table; add one with `pygirder cloud init`"
        )
    if not isinstance(section, dict):
        raise CloudConfigError(f"{file}: [{SECTION}] must be a table")
    return config_from_dict(section, base_dir=file.parent, source=str(file))


def config_from_dict(
    data: dict[str, Any], *, base_dir: Path | None = None, source: str = "[cloud]"
) -> CloudConfig:
    """Validate a ``[cloud]`` mapping (as read from TOML) into a :class:`CloudConfig`."""
    data = dict(data)
    for key in ("public_key_file", "cluster_key_file"):
        value = data.get(key)
        if isinstance(value, str) and value and base_dir is not None:
            expanded = Path(value).expanduser()
            data[key] = expanded if expanded.is_absolute() else base_dir / expanded
        elif value == "":
            data[key] = None if key == "cluster_key_file" else value
    try:
        return CloudConfig.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc, data, source) from None


def _config_error(exc: ValidationError, data: dict[str, Any], source: str) -> CloudConfigError:
    problems: list[tuple[str, Any, str]] = []
    allowed_keys = ", ".join(CloudConfig.model_fields)
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        key = ".".join(loc) if loc else "(table)"
        value = err.get("input")
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = f"unknown key; allowed keys are: {allowed_keys}"
        problems.append((key, value, message))
    lines = [f"invalid [{SECTION}] settings in {source}:"]
    for key, value, message in problems:
        shown = "" if value is None or isinstance(value, dict) else f" = {value!r}"
        lines.append(f"  {key}{shown}: {message}")
    return CloudConfigError("\n".join(lines), problems=problems)


# ----------------------------------------------------------------------- init


def default_config_text(
    *,
    name: str = "default",
    region: str = "us-east-1",
    zone: str = "",
    ssh_from: str = "",
) -> str:
    """A commented ``[cloud]`` table with every key at its default (for ``cloud init``)."""
    zone = zone or f"{region}a"
    ssh_line = (
        f'ssh_from = "{ssh_from}"'
        if ssh_from
        else f'ssh_from = ""  # REQUIRED before setup: your address, e.g. "{EXAMPLE_SSH_FROM}"'
    )
    return f"""\
# pygirder AWS settings: `pygirder cloud plan` shows what `pygirder cloud setup` would do.
# Credentials are NOT stored here: pygirder uses the standard AWS chain
# (AWS_PROFILE / `profile` below, `aws sso login`, environment variables).
[cloud]
name = "{name}"                 # names and tags every resource: pygirder-{name}-...
region = "{region}"
zone = "{zone}"                # both subnets live in this availability zone
# profile = "my-profile"        # an AWS CLI profile; omit to use the default chain

# Network.  SSH is opened only to ssh_from; anything wider than a /16 (such as
# "0.0.0.0/0") is refused unless allow_ssh_from_anywhere = true.
vpc_cidr = "10.42.0.0/16"
public_subnet_cidr = "10.42.0.0/20"
private_subnet_cidr = "10.42.128.0/17"
{ssh_line}
allow_ssh_from_anywhere = false
nat = "instance"                # "instance": a small NAT instance kept stopped when idle
                                # "gateway": a managed NAT gateway (about $33/month idle)
nat_instance_type = "t4g.nano"
redis_market = "on-demand"      # the redis node holds the grid; "spot" saves a little
redis_instance_type = "m7g.medium"  # Graviton (arm64): bake with `image build --arch arm64`

# Keys.  Your public key is imported; without ~/.ssh/id_ed25519.pub, setup creates a
# pygirder key pair in ~/.pygirder/keys/ (private half mode 0600).  The intra-cluster
# key is created by AWS and its private half saved locally with mode 0600.
public_key_file = "~/.ssh/id_ed25519.pub"
# cluster_key_file = "~/.pygirder/keys/pygirder-{name}-cluster.pem"

# Artifacts bucket (default name: pygirder-{name}-<account id>-{region}).
# bucket = "my-bucket-name"
artifact_prefix = "artifacts/"
artifact_retention_days = 30    # older artifacts are deleted by a lifecycle rule
result_retention_days = 30      # fleets' durable results (results/) expire after this

# Billing.  CloudWatch alarms on the account's estimated charges (USD) and a monthly
# budget with actual and forecast alerts.  Alerts go to this address when set.
alarm_thresholds_usd = [1, 10, 100]
budget_usd = 25
# alert_email = "you@example.com"

# Extra tags put on every resource (keys must not start with "aws:" or "pygirder:").
[cloud.tags]
# project = "my-project"
"""
