"""Artifacts: the user's project and pygirder as wheels in one content-addressed tar.gz on S3.

An artifact is what an instance installs: the laptop builds it, ``push_artifact``
uploads it once (under its SHA-256), and the on-instance agent downloads it, checks
the hash and installs it into a fresh virtual environment (:mod:`.instance.install`).
Instances never talk to the laptop, and the hash in the user-data is the only trust
anchor.

Format (``pygirder-artifact/1``), a gzip'd tar with sorted members, fixed mtimes,
owners and modes, so the same inputs always give the same bytes and the same hash::

    manifest.json         {"format", "project", "wheels": [{file, name, version, sha256}],
                           "install": [names], "modules": [top-level modules], "python",
                           "pygirder_version"}
    wheels/<name>-<version>-py3-none-any.whl   one per distribution, project first

The wheels:

- **the project**: a directory with ``pyproject.toml``, ``setup.py`` or ``setup.cfg``
  is built the way its users build it: ``python -m build --wheel`` where the ``build``
  package is installed, else ``python -m pip wheel --no-deps``, both with build
  isolation, so the build backend comes from pip's configured index (``PIP_INDEX_URL``,
  ``pip.conf``).  ``offline=True`` builds with ``--no-build-isolation --no-index``
  instead: the backend (and ``wheel`` for an old setuptools) must then be installed
  where pygirder runs, and a missing one is named before pip runs.
  ``SOURCE_DATE_EPOCH`` is set so the wheel is reproducible.  A plain directory of
  scripts is packed as-is into a simple wheel named after the directory (version
  ``0.0.0``): its top-level ``*.py`` modules and its packages (directories with an
  ``__init__.py``), leaving out ``setup.py``, ``conftest.py``, ``test_*.py``, tests
  directories, caches and hidden files.
- **pygirder**: the installed package is re-packed as a wheel with the installed
  distribution's metadata (Requires-Dist, entry points), so editable and regular
  installs work alike, offline, with no build backend.

Third-party dependencies are *not* in the artifact: they come from the environment
the agent runs in (the template image), on which the installed venv is layered
(see :func:`pygirder.cloud.instance.install.install_artifact`, the instance's side).
pip resolves the wheels' requirements against it and fails with a clear "No matching
distribution" if one is missing.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PygirderError

__all__ = [
    "ARTIFACT_FORMAT",
    "Artifact",
    "ArtifactError",
    "ArtifactIntegrityError",
    "build_artifact",
    "download_artifact",
    "list_artifacts",
    "parse_s3_uri",
    "push_artifact",
]

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = "pygirder-artifact/1"
# 1980-01-01, the earliest time a zip file can hold; used for every member.
_EPOCH = 315532800
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_SKIP_DIRS = {"__pycache__", "tests", "test", "build", "dist", "venv", "node_modules"}
_SKIP_MODULES = {"setup.py", "conftest.py"}


class ArtifactError(PygirderError):
    """An artifact cannot be built, uploaded, downloaded or installed."""


class ArtifactIntegrityError(ArtifactError):
    """A downloaded artifact does not have the expected SHA-256: it was not installed."""

    def __init__(self, uri: str, expected: str, actual: str) -> None:
        super().__init__(
            f"artifact {uri} has sha256 {actual}, expected {expected}: refusing to install it "
            "(the object was changed after it was pushed, or the user-data names another "
            "artifact); push the artifact again and relaunch"
        )
        self.uri = uri
        self.expected = expected
        self.actual = actual


@dataclass(frozen=True)
class Artifact:
    """A built artifact: ``name`` is the file name, ``<sha256>.tar.gz``."""

    path: Path
    sha256: str
    name: str
    manifest: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


# -- wheels ------------------------------------------------------------------------
def _normalize(name: str) -> str:
    """A distribution name as wheel file names spell it (PEP 427/503)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _write_wheel(
    out_dir: Path,
    name: str,
    version: str,
    files: dict[str, bytes],
    *,
    metadata: str | None = None,
    entry_points: str | None = None,
) -> Path:
    """Write a pure-Python wheel deterministically: sorted members, fixed times and modes."""
    dist = _normalize(name)
    info = f"{dist}-{version}.dist-info"
    if metadata is None:
        metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    members = dict(files)
    members[f"{info}/METADATA"] = metadata.encode()
    members[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: pygirder\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    if entry_points:
        members[f"{info}/entry_points.txt"] = entry_points.encode()
    record = [f"{arc},{_record_hash(data)},{len(data)}" for arc, data in sorted(members.items())]
    record.append(f"{info}/RECORD,,")
    members[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = out_dir / f"{dist}-{version}-py3-none-any.whl"
    # dist-info last, RECORD last of all, as installers expect.
    order = sorted(members, key=lambda arc: (arc.startswith(info), arc == f"{info}/RECORD", arc))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for arc in order:
            zi = zipfile.ZipInfo(arc, date_time=_ZIP_TIME)
            zi.external_attr = 0o644 << 16
            zi.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(zi, members[arc])
    return path


def _package_files(package_dir: Path, arc_prefix: str) -> dict[str, bytes]:
    files = {}
    for path in sorted(package_dir.rglob("*")):
        rel = path.relative_to(package_dir)
        if any(part == "__pycache__" or part.startswith(".") for part in rel.parts):
            continue
        if path.is_file() and path.suffix not in (".pyc", ".pyo"):
            files[f"{arc_prefix}/{rel.as_posix()}"] = path.read_bytes()
    return files


def _pygirder_wheel(out_dir: Path) -> Path:
    """Re-pack the running pygirder package with its installed distribution's metadata."""
    package_dir = Path(__file__).resolve().parent.parent
    try:
        dist = importlib.metadata.distribution("pygirder")
    except importlib.metadata.PackageNotFoundError as exc:
        raise ArtifactError(
            "pygirder is not installed as a distribution (no metadata found): install it "
            "with `pip install -e .` or `pip install pygirder` before building artifacts"
        ) from exc
    return _write_wheel(
        out_dir,
        "pygirder",
        dist.version,
        _package_files(package_dir, "pygirder"),
        metadata=dist.read_text("METADATA"),
        entry_points=dist.read_text("entry_points.txt"),
    )


def _plain_modules(project_dir: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for path in sorted(project_dir.iterdir()):
        if path.name.startswith(".") or path.name == "__pycache__":
            continue
        if path.is_file() and path.suffix == ".py":
            if path.name in _SKIP_MODULES or path.name.startswith("test_"):
                continue
            files[path.name] = path.read_bytes()
        elif path.is_dir() and path.name not in _SKIP_DIRS and (path / "__init__.py").exists():
            files.update(_package_files(path, path.name))
    return files


def _project_wheel(project_dir: Path, out_dir: Path, *, offline: bool = False) -> Path:
    if any((project_dir / f).exists() for f in ("pyproject.toml", "setup.py", "setup.cfg")):
        return _built_wheel(project_dir, out_dir, offline=offline)
    files = _plain_modules(project_dir)
    if not files:
        raise ArtifactError(
            f"no Python modules found in {project_dir}: put the grid functions in top-level "
            ".py files or packages there, or add a pyproject.toml"
        )
    name = re.sub(r"[^A-Za-z0-9]+", "_", project_dir.name).strip("_") or "project"
    return _write_wheel(out_dir, name, "0.0.0", files)


# What pip assumes for a project without a [build-system] table (PEP 518).
_LEGACY_REQUIRES = ["setuptools>=40.8.0"]


def _build_requires(project_dir: Path) -> list[str]:
    """The project's declared build requirements (``[build-system] requires``)."""
    import tomllib

    pyproject = project_dir / "pyproject.toml"
    if not pyproject.is_file():
        return list(_LEGACY_REQUIRES)
    try:
        table = tomllib.loads(pyproject.read_text()).get("build-system", {})
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read {pyproject}: {exc}") from exc
    if "requires" not in table:
        return list(_LEGACY_REQUIRES)
    return [str(r) for r in table["requires"]]


def _missing_for_offline(project_dir: Path) -> list[str]:
    """Build requirements not installed here, by distribution name (versions unchecked)."""
    missing = []
    for requirement in _build_requires(project_dir):
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
        if match and not _installed(match.group(1)):
            missing.append(match.group(1))
    return missing


def _offline_hint(names: list[str]) -> str:
    quoted = ", ".join(f"`{n}`" for n in names)
    return (
        f"install {quoted} (pip install {' '.join(names)}) into {sys.prefix}, "
        "or drop --offline to build in an isolated environment from the package index"
    )


def _installed(name: str) -> bool:
    """Whether a distribution is installed (not merely a ``build/`` folder on sys.path)."""
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _built_wheel(project_dir: Path, out_dir: Path, *, offline: bool) -> Path:
    build_dir = out_dir / "pip-build"
    build_dir.mkdir()
    if offline:
        missing = _missing_for_offline(project_dir)
        if missing:
            raise ArtifactError(
                f"cannot build {project_dir} offline: its build requirements are not "
                f"installed here; {_offline_hint(missing)}"
            )
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
               "--no-index", "--disable-pip-version-check", "--quiet", "-w", str(build_dir),
               str(project_dir)]  # fmt: skip
        how = "pip wheel --offline (no index, no build isolation)"
    elif _installed("build"):
        cmd = [sys.executable, "-m", "build", "--wheel", "--outdir", str(build_dir),
               str(project_dir)]  # fmt: skip
        how = "python -m build --wheel"
    else:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
               "--quiet", "-w", str(build_dir), str(project_dir)]  # fmt: skip
        how = "pip wheel (with build isolation, from pip's configured index)"
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(_EPOCH)}
    log.info("building %s with %s", project_dir, how)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wheels = sorted(build_dir.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        said = (proc.stdout + proc.stderr).strip()
        if "invalid command 'bdist_wheel'" in said:
            hint = _offline_hint(["wheel"])
        elif offline:
            hint = "offline builds use only what is installed here; drop --offline to use the index"
        else:
            hint = "fix the build (try the same command by hand), or pass --offline to build "
            hint += "with the build backend installed here"
        raise ArtifactError(
            f"could not build a wheel of {project_dir} with {how} (exit {proc.returncode}, "
            f"{len(wheels)} wheel(s)): {hint}. The build said:\n{said[-3000:]}"
        )
    if not wheels[0].name.endswith("-none-any.whl"):
        log.warning("%s is not a pure-Python wheel: instances must match this platform", wheels[0])
    return wheels[0]


def _wheel_info(path: Path) -> dict[str, Any]:
    """Name, version and top-level modules of a wheel, read from its contents."""
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        info_dir = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        meta = zf.read(f"{info_dir}/METADATA").decode()
    fields = dict(
        line.split(": ", 1) for line in meta.splitlines() if ": " in line and line[0] != " "
    )
    modules = set()
    for n in names:
        top = n.split("/")[0]
        if top.endswith((".dist-info", ".data")):
            continue
        if "/" in n:
            modules.add(top)
        elif top.endswith(".py"):
            modules.add(top[:-3])
    return {"name": fields["Name"], "version": fields["Version"], "modules": sorted(modules)}


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _add_member(tar: tarfile.TarFile, arcname: str, data: bytes) -> None:
    info = tarfile.TarInfo(arcname)
    info.size = len(data)
    info.mtime = _EPOCH
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def build_artifact(
    project_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    offline: bool = False,
) -> Artifact:
    """Build ``<out_dir>/<sha256>.tar.gz`` from the project and the running pygirder.

    Deterministic: the same sources and the same pygirder give the same bytes.  A
    packaged project is built with build isolation from pip's configured index, or,
    with ``offline=True``, with the build backend installed here (module docstring).
    """
    project = Path(project_dir).resolve()
    if not project.is_dir():
        raise ArtifactError(f"project directory {project} does not exist")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pygirder-build-") as tmp:
        tmp_dir = Path(tmp)
        wheels = [_project_wheel(project, tmp_dir, offline=offline)]
        infos = [_wheel_info(wheels[0])]
        if _normalize(infos[0]["name"]) != "pygirder":
            wheels.append(_pygirder_wheel(tmp_dir))
            infos.append(_wheel_info(wheels[-1]))
        entries = []
        for wheel, info in zip(wheels, infos, strict=True):
            entries.append(
                {
                    "file": f"wheels/{wheel.name}",
                    "name": info["name"],
                    "version": info["version"],
                    "sha256": sha256_file(wheel),
                }
            )
        manifest = {
            "format": ARTIFACT_FORMAT,
            "project": {"name": infos[0]["name"], "version": infos[0]["version"]},
            "wheels": entries,
            "install": [e["name"] for e in entries],
            "modules": infos[0]["modules"],
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "pygirder_version": infos[-1]["version"],
        }
        blob = io.BytesIO()
        with (
            gzip.GzipFile(filename="", mode="wb", fileobj=blob, mtime=0) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            _add_member(tar, "manifest.json", json.dumps(manifest, indent=2).encode())
            for wheel, entry in sorted(
                zip(wheels, entries, strict=True), key=lambda p: p[1]["file"]
            ):
                _add_member(tar, entry["file"], wheel.read_bytes())
        data = blob.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    path = out / f"{sha}.tar.gz"
    tmp_path = path.with_suffix(".part")
    tmp_path.write_bytes(data)
    tmp_path.replace(path)
    return Artifact(path=path, sha256=sha, name=path.name, manifest=manifest)


# -- S3 ------------------------------------------------------------------------------
def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key), with a clear error for anything else."""
    match = re.fullmatch(r"s3://([^/]+)/(.+)", uri)
    if not match:
        raise ArtifactError(f"not an S3 URI: {uri!r} (expected s3://bucket/key)")
    return match.group(1), match.group(2)


def _s3_client(client: Any = None) -> Any:
    if client is not None:
        return client
    try:
        import boto3
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ArtifactError(
            "boto3 is needed for artifacts on S3: pip install 'pygirder[cloud]'"
        ) from exc
    return boto3.client("s3")


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def push_artifact(
    artifact: Artifact, bucket: str, prefix: str = "artifacts/", *, client: Any = None
) -> str:
    """Upload the artifact unless its key already exists; returns its ``s3://`` URI.

    The key is content-addressed, so an existing object is the same artifact: the
    second push of the same build uploads nothing.  The SHA-256 is stored in the
    object's metadata (``sha256``) and checked by S3 on upload.
    """
    s3 = _s3_client(client)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    key = f"{prefix}{artifact.name}"
    uri = f"s3://{bucket}/{key}"
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        if _error_code(exc) not in ("404", "NoSuchKey", "NotFound"):
            raise ArtifactError(f"cannot check {uri}: {exc}") from exc
    else:
        stored = head.get("Metadata", {}).get("sha256")
        if stored and stored != artifact.sha256:
            raise ArtifactError(
                f"{uri} exists with sha256 {stored} in its metadata, not {artifact.sha256}: "
                "someone wrote to the artifact prefix; delete that object and push again"
            )
        log.info("artifact %s already on S3, not uploading", uri)
        return uri
    digest = bytes.fromhex(artifact.sha256)
    project = artifact.manifest.get("project", {})
    metadata = {
        "sha256": artifact.sha256,
        "project": str(project.get("name", "")),
        "project-version": str(project.get("version", "")),
        "pygirder-version": str(artifact.manifest.get("pygirder_version", "")),
    }
    with open(artifact.path, "rb") as body:
        s3.put_object(
            Bucket=bucket,
            Key=key,
            Body=body,
            ContentType="application/gzip",
            Metadata=metadata,
            ChecksumSHA256=base64.b64encode(digest).decode(),
        )
    log.info("uploaded artifact %s", uri)
    return uri


def list_artifacts(bucket: str, prefix: str = "artifacts/", *, client: Any = None) -> list[dict]:
    """The artifacts under ``prefix``, newest first: uri, sha256, size, modified, project."""
    s3 = _s3_client(client)
    found = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if not key.endswith(".tar.gz"):
                continue
            meta = s3.head_object(Bucket=bucket, Key=key).get("Metadata", {})
            found.append(
                {
                    "uri": f"s3://{bucket}/{key}",
                    "sha256": meta.get("sha256", ""),
                    "project": meta.get("project", ""),
                    "pygirder_version": meta.get("pygirder-version", ""),
                    "size": obj["Size"],
                    "modified": obj["LastModified"],
                }
            )
    found.sort(key=lambda a: a["modified"], reverse=True)
    return found


def download_artifact(
    uri: str, sha256: str, dest_dir: str | os.PathLike[str], *, client: Any = None
) -> Path:
    """Download ``uri`` into ``dest_dir`` and check its SHA-256; nothing is left on mismatch."""
    bucket, key = parse_s3_uri(uri)
    expected = sha256.lower()
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise ArtifactError(f"--sha256 must be 64 hex digits, got {sha256!r}")
    s3 = _s3_client(client)
    dest = Path(dest_dir) / Path(key).name
    partial = dest.with_name(dest.name + ".part")
    try:
        s3.download_file(bucket, key, str(partial))
    except Exception as exc:
        partial.unlink(missing_ok=True)
        raise ArtifactError(f"cannot download {uri}: {exc}") from exc
    actual = sha256_file(partial)
    if actual != expected:
        partial.unlink()
        raise ArtifactIntegrityError(uri, expected, actual)
    partial.replace(dest)
    return dest
