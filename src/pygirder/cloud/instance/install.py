"""Installing an artifact on the instance: download, verify, and a fresh virtual
environment layered on the image's Python.

The format and the bucket side (build, push, list, download) are
:mod:`pygirder.cloud.artifacts`; this is what the agent's ``fetch-artifact`` runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import site
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..artifacts import ARTIFACT_FORMAT, ArtifactError, download_artifact, parse_s3_uri, sha256_file

log = logging.getLogger(__name__)

# Written last into an installed venv: its content is the artifact's sha256.
INSTALLED_MARKER = ".pygirder-artifact"


def _read_bundle(bundle: Path, into: Path) -> dict[str, Any]:
    with tarfile.open(bundle, "r:gz") as tar:
        tar.extractall(into, filter="data")
    try:
        manifest = json.loads((into / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{bundle.name} has no readable manifest.json: {exc}") from exc
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(
            f"{bundle.name} has format {manifest.get('format')!r}, this pygirder reads "
            f"{ARTIFACT_FORMAT!r}: build the artifact with a matching pygirder"
        )
    for entry in manifest["wheels"]:
        wheel = into / entry["file"]
        if not wheel.is_file() or sha256_file(wheel) != entry["sha256"]:
            raise ArtifactError(f"{bundle.name}: {entry['file']} is missing or does not match")
    return manifest


def _base_site_dirs() -> list[str]:
    """Site directories of the environment this code runs in (the image's pygirder)."""
    dirs = [*site.getsitepackages()]
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


@contextlib.contextmanager
def _removed_on_error(path: Path) -> Iterator[None]:
    try:
        yield
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


def _pip(venv_python: Path, args: list[str]) -> None:
    cmd = [str(venv_python), "-m", "pip", "--isolated", "--disable-pip-version-check", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip()[-3000:]
        raise ArtifactError(f"pip failed installing the artifact ({' '.join(args[:2])}):\n{tail}")


def install_artifact(
    uri: str, sha256: str, venv_dir: str | os.PathLike[str], *, client: Any = None
) -> dict[str, Any]:
    """Download, verify and install an artifact into the virtual environment ``venv_dir``.

    The venv is layered on the environment running this code (its site directories
    are added through a ``.pth`` file), so the image's third-party packages satisfy
    the wheels' requirements and the artifact's own pygirder shadows the image's.
    Installing is all or nothing: on any failure ``venv_dir`` is removed.  Installing
    the artifact a venv already holds does nothing.  Returns the manifest.
    """
    parse_s3_uri(uri)
    if not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ArtifactError(f"--sha256 must be 64 hex digits, got {sha256!r}")
    venv = Path(venv_dir).absolute()
    marker = venv / INSTALLED_MARKER
    if marker.is_file() and marker.read_text().strip() == sha256.lower():
        log.info("artifact %s already installed in %s", sha256[:12], venv)
        return json.loads((venv / "pygirder-manifest.json").read_text())
    if venv.exists() and not (venv / "pyvenv.cfg").exists():
        raise ArtifactError(
            f"{venv} exists and is not a virtual environment: choose another --venv"
        )
    venv.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pygirder-fetch-", dir=venv.parent) as tmp:
        tmp_dir = Path(tmp)
        bundle = download_artifact(uri, sha256, tmp_dir, client=client)
        unpacked = tmp_dir / "unpacked"
        manifest = _read_bundle(bundle, unpacked)
        here = f"{sys.version_info.major}.{sys.version_info.minor}"
        if manifest.get("python") != here:
            log.warning(
                "the artifact was built with Python %s, this is Python %s: its pure-Python "
                "wheels install, but code that needs the newer Python will fail",
                manifest.get("python"), here,
            )  # fmt: skip
        if venv.exists():
            shutil.rmtree(venv)
        with _removed_on_error(venv):
            _create_venv(venv)
            python = venv / "bin" / "python"
            wheels = [str(unpacked / e["file"]) for e in manifest["wheels"]]
            links = str(unpacked / "wheels")
            # Our wheels over whatever the image has (same version or not), then a
            # resolve of their requirements against the layered environment.
            _pip(python, ["install", "--no-index", "--no-deps", "--force-reinstall", *wheels])
            _pip(python, ["install", "--no-index", "--find-links", links, *manifest["install"]])
            (venv / "pygirder-manifest.json").write_text(json.dumps(manifest, indent=2))
            marker.write_text(sha256.lower() + "\n")
    log.info("installed artifact %s (%s) into %s", sha256[:12], manifest["project"]["name"], venv)
    return manifest


def _create_venv(venv: Path) -> None:
    import importlib.util
    import venv as venv_module

    has_pip = importlib.util.find_spec("pip") is not None
    venv_module.EnvBuilder(with_pip=not has_pip, symlinks=True).create(venv)
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    lines = [f"import site; site.addsitedir({d!r})" for d in _base_site_dirs()]
    Path(purelib, "_pygirder_base.pth").write_text("\n".join(lines) + "\n")
