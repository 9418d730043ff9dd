"""EC2 key pairs (the user's and the cluster's) and the private key file on disk."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..config import CloudConfig
from ..errors import CloudConfigError
from ..tags import (
    from_tag_list,
    is_owned,
)
from .kind import Ctx, Kind
from .model import Action, Drift, Found

# ------------------------------------------------------------------- key pairs


class KeyPair(Kind):
    """An EC2 key pair named ``pygirder-<name>-<key>`` (key names are unique)."""

    def find(self, ctx: Ctx) -> list[Found]:
        got = ctx.call(
            "ec2",
            "describe_key_pairs",
            KeyNames=[self.label(ctx)],
            IncludePublicKey=True,
            ignore=("InvalidKeyPair.NotFound",),
        )
        pairs = (got or {}).get("KeyPairs", [])
        if not pairs:
            return []
        pair = pairs[0]
        if not is_owned(from_tag_list(pair.get("Tags")), ctx.name):
            return self.clash(ctx, f"EC2 key pair {pair['KeyName']}")
        return [Found(id=pair["KeyPairId"], name=pair["KeyName"], data=pair)]

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.delete("ec2", "delete_key_pair", KeyName=found.name)


class UserKey(KeyPair):
    key = "user-key"
    title = "Your key pair"

    def label(self, ctx: Ctx) -> str:
        return ctx.config.resource_name("user")

    def check(self, ctx: Ctx, found: Found) -> list[Drift]:
        local = ctx.public_key or _try_public_key(ctx.config)
        remote = found.data.get("PublicKey")
        if local and remote and _key_body(local) != _key_body(remote):
            return [Drift(Action.REPLACE, f"differs from {ctx.config.public_key_path}")]
        return []

    def create(self, ctx: Ctx) -> Found:
        material = ctx.public_key or read_public_key(ctx.config)
        pair = ctx.call(
            "ec2",
            "import_key_pair",
            KeyName=self.label(ctx),
            PublicKeyMaterial=material.encode(),
            TagSpecifications=ctx.tag_specs(self.key, "key-pair"),
        )
        return Found(id=pair["KeyPairId"], name=pair["KeyName"], data=pair)

    def describe(self, ctx: Ctx, found: Found) -> str:
        return f"from {ctx.config.public_key_path}"


class ClusterKey(KeyPair):
    key = "cluster-key"
    title = "Cluster key pair"

    def label(self, ctx: Ctx) -> str:
        return ctx.config.resource_name("cluster")

    def check(self, ctx: Ctx, found: Found) -> list[Drift]:
        path = ctx.config.cluster_key_path
        if not path.is_file():
            return [Drift(Action.REPLACE, f"private key {path} is missing locally")]
        return []

    def create(self, ctx: Ctx) -> Found:
        pair = ctx.call(
            "ec2",
            "create_key_pair",
            KeyName=self.label(ctx),
            KeyType="ed25519",
            KeyFormat="pem",
            TagSpecifications=ctx.tag_specs(self.key, "key-pair"),
        )
        try:
            write_private_key(ctx.config.cluster_key_path, pair["KeyMaterial"])
        except OSError as exc:
            ctx.delete("ec2", "delete_key_pair", KeyPairId=pair["KeyPairId"])
            raise CloudConfigError(
                f"cannot write the cluster key to {ctx.config.cluster_key_path}: {exc}; "
                "set [cloud] cluster_key_file to a writable path",
                problems=[("cluster_key_file", str(ctx.config.cluster_key_path), str(exc))],
            ) from exc
        ctx.say(f"  saved the cluster private key to {ctx.config.cluster_key_path} (mode 0600)")
        data = {k: v for k, v in pair.items() if k != "KeyMaterial"}
        return Found(id=pair["KeyPairId"], name=pair["KeyName"], data=data)

    def delete(self, ctx: Ctx, found: Found) -> None:
        super().delete(ctx, found)
        path = ctx.config.cluster_key_path
        if path.is_file():
            path.unlink()
            ctx.say(f"  removed {path}")

    def describe(self, ctx: Ctx, found: Found) -> str:
        path = ctx.config.cluster_key_path
        return f"private key {path}" if path.is_file() else f"private key {path} MISSING"


def write_private_key(path: Path, material: str) -> None:
    """Write a private key atomically, readable by its owner only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".pygirder-key-", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(material if material.endswith("\n") else material + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_PUBLIC_KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp", "sk-ssh-ed25519", "sk-ecdsa")


def ensure_key_pair(config: CloudConfig) -> Path | None:
    """Create pygirder's own SSH key pair when the config relies on it and it is missing.

    Returns the private key's path when it was created now, else None.  The key is
    ed25519, made with the ``cryptography`` package (``ssh-keygen`` when that is not
    installed); the private half is written with mode 0600 in a 0700 folder, and
    never overwritten.
    """
    if not config.uses_pygirder_key:
        return None
    private = config.pygirder_key_path
    public = config.public_key_path
    if public.exists():
        return None
    private.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if private.exists():
        raise CloudConfigError(
            f"{private} exists but its public half {public} does not: recreate it with "
            f"`ssh-keygen -y -f {private} > {public}`, or set [cloud] public_key_file",
            problems=[("public_key_file", str(config.public_key_file), "a public key file")],
        )
    comment = f"pygirder@{os.uname().nodename}"
    try:
        private_text, public_text = _new_ed25519_key(comment)
    except ImportError:
        if not shutil.which("ssh-keygen"):
            raise CloudConfigError(
                "no SSH key: ~/.ssh/id_ed25519.pub does not exist and pygirder cannot "
                "create one (install the `cryptography` package, or ssh-keygen); or set "
                "[cloud] public_key_file to your .pub file",
                problems=[("public_key_file", str(config.public_key_file), "a public key")],
            ) from None
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(private)],
            check=True, stdin=subprocess.DEVNULL, capture_output=True,
        )  # fmt: skip
        os.chmod(private, 0o600)
        return private
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(private_text)
    public.write_text(public_text)
    return private


def _new_ed25519_key(comment: str) -> tuple[str, str]:
    """(OpenSSH private key, public key line) of a new ed25519 key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, f"{public.decode()} {comment}\n"


def read_public_key(config: CloudConfig) -> str:
    """The user's OpenSSH public key, or an error that says how to make one."""
    path = config.public_key_path
    problem = [("public_key_file", str(config.public_key_file), "an OpenSSH public key file")]
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        if config.uses_pygirder_key:
            raise CloudConfigError(
                f"no SSH key yet: {config.public_key_file} does not exist, so `pygirder "
                f"cloud setup` will create a pygirder key pair at {config.pygirder_key_path} "
                "(or set [cloud] public_key_file to your own .pub file)",
                problems=problem,
            ) from None
        raise CloudConfigError(
            f"[cloud] public_key_file {path} does not exist; create a key with "
            f"`ssh-keygen -t ed25519` or point public_key_file at your .pub file",
            problems=problem,
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CloudConfigError(
            f"cannot read [cloud] public_key_file {path}: {exc}", problems=problem
        ) from None
    if "PRIVATE KEY" in text:
        raise CloudConfigError(
            f"[cloud] public_key_file {path} is a PRIVATE key; point it at the matching "
            ".pub file (pygirder never uploads private keys)",
            problems=problem,
        )
    first = text.splitlines()[0] if text else ""
    if not first.startswith(_PUBLIC_KEY_TYPES) or len(first.split()) < 2:
        raise CloudConfigError(
            f"[cloud] public_key_file {path} is not an OpenSSH public key (expected a "
            "line starting with ssh-ed25519, ssh-rsa or ecdsa-sha2-...)",
            problems=problem,
        )
    return first


def _try_public_key(config: CloudConfig) -> str | None:
    try:
        return read_public_key(config)
    except CloudConfigError:
        return None


def _key_body(line: str) -> tuple[str, ...]:
    return tuple(line.split()[:2])  # type and base64 key; the comment does not count
