"""Artifacts: reproducible builds, idempotent pushes, and fetches that refuse tampered objects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from pygirder.cloud.artifacts import (
    ArtifactError,
    ArtifactIntegrityError,
    build_artifact,
    list_artifacts,
    parse_s3_uri,
    push_artifact,
)
from pygirder.cloud.instance.install import install_artifact

BUCKET = "pygirder-artifacts-test"


def make_project(root: Path) -> Path:
    """A plain directory of scripts, the way most grid users start."""
    project = root / "pricing"
    (project / "models").mkdir(parents=True)
    (project / "gridjobs.py").write_text("def price(i, j):\n    return i * 10 + j\n")
    (project / "models" / "__init__.py").write_text("RATE = 0.05\n")
    (project / "models" / "table.csv").write_text("a,b\n1,2\n")
    (project / "setup_notes.txt").write_text("not a module\n")
    (project / "test_gridjobs.py").write_text("def test_it(): pass\n")
    (project / "tests").mkdir()
    (project / "tests" / "__init__.py").write_text("")
    (project / "__pycache__").mkdir()
    (project / "__pycache__" / "gridjobs.cpython-311.pyc").write_bytes(b"\0junk")
    return project


@pytest.fixture
def bucket(aws) -> str:
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    return BUCKET


def test_build_is_reproducible_and_content_addressed(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    first = build_artifact(project, tmp_path / "a")
    second = build_artifact(project, tmp_path / "b")
    assert first.sha256 == second.sha256
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.name == f"{first.sha256}.tar.gz" == first.path.name
    (project / "gridjobs.py").write_text("def price(i, j):\n    return i * 11 + j\n")
    assert build_artifact(project, tmp_path / "c").sha256 != first.sha256


def test_artifact_layout_and_manifest(tmp_path: Path) -> None:
    artifact = build_artifact(make_project(tmp_path), tmp_path / "out")
    with tarfile.open(artifact.path) as tar:
        members = tar.getmembers()
        manifest = json.load(tar.extractfile("manifest.json"))
    assert [m.name for m in members] == [
        "manifest.json",
        "wheels/pricing-0.0.0-py3-none-any.whl",
        f"wheels/pygirder-{manifest['pygirder_version']}-py3-none-any.whl",
    ]
    assert {(m.mtime, m.uid, m.gid, m.mode) for m in members} == {(315532800, 0, 0, 0o644)}
    assert manifest["format"] == "pygirder-artifact/1"
    assert manifest["install"] == ["pricing", "pygirder"]
    assert manifest["modules"] == ["gridjobs", "models"]
    assert manifest == artifact.manifest


def test_a_directory_without_modules_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no Python modules found"):
        build_artifact(tmp_path / "empty", tmp_path / "out")


BACKEND = '''
"""A tiny in-tree PEP 517 backend, so the pip path is tested without a network."""
from pathlib import Path
from pygirder.cloud.artifacts import _write_wheel

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    files = {"packaged/__init__.py": Path("packaged/__init__.py").read_bytes()}
    return _write_wheel(Path(wheel_directory), "packaged", "1.2.3", files).name
'''


def test_an_offline_build_uses_the_backend_installed_here(tmp_path: Path) -> None:
    project = tmp_path / "packaged-project"
    (project / "packaged").mkdir(parents=True)
    (project / "packaged" / "__init__.py").write_text("ANSWER = 42\n")
    (project / "backend.py").write_text(BACKEND)
    (project / "pyproject.toml").write_text(
        textwrap.dedent("""
        [build-system]
        requires = []
        build-backend = "backend"
        backend-path = ["."]
        """)
    )
    # The in-tree backend imports pygirder, which only this environment has.
    first = build_artifact(project, tmp_path / "a", offline=True)
    assert first.manifest["project"] == {"name": "packaged", "version": "1.2.3"}
    assert first.manifest["modules"] == ["packaged"]
    assert build_artifact(project, tmp_path / "b", offline=True).sha256 == first.sha256

    (project / "backend.py").write_text("raise SystemExit('backend is broken')\n")
    with pytest.raises(
        ArtifactError, match=r"(?s)could not build a wheel.*drop --offline.*backend is broken"
    ):
        build_artifact(project, tmp_path / "c", offline=True)


def setuptools_project(root: Path, requires: str = '["setuptools>=61"]') -> Path:
    """A project laid out the way the setuptools and packaging guides lay one out."""
    project = root / "pricing-models"
    (project / "src" / "pricing").mkdir(parents=True)
    (project / "src" / "pricing" / "__init__.py").write_text("RATE = 0.05\n")
    (project / "src" / "pricing" / "jobs.py").write_text("def price(i):\n    return i * 2\n")
    (project / "pyproject.toml").write_text(
        textwrap.dedent(f"""
        [build-system]
        requires = {requires}
        build-backend = "setuptools.build_meta"

        [project]
        name = "pricing-models"
        version = "0.3.0"
        """)
    )
    return project


def test_a_setuptools_project_builds_with_build_isolation(tmp_path: Path) -> None:
    # Build isolation installs the backend from pip's configured index; nothing of
    # it has to be installed where pygirder runs.
    project = setuptools_project(tmp_path, requires='["setuptools>=61", "wheel"]')
    artifact = build_artifact(project, tmp_path / "out")
    assert artifact.manifest["project"] == {"name": "pricing-models", "version": "0.3.0"}
    assert artifact.manifest["modules"] == ["pricing"]
    assert [w["name"] for w in artifact.manifest["wheels"]] == ["pricing-models", "pygirder"]


def test_an_offline_build_names_the_build_requirement_that_is_missing(tmp_path: Path) -> None:
    project = setuptools_project(tmp_path, requires='["setuptools>=61", "no-such-backend"]')
    with pytest.raises(ArtifactError) as caught:
        build_artifact(project, tmp_path / "out", offline=True)
    message = str(caught.value)
    assert "install `no-such-backend` (pip install no-such-backend)" in message
    assert "or drop --offline" in message
    assert "setuptools" not in message.split("install", 1)[1].split("(")[0]  # it is installed


def test_an_offline_bdist_wheel_failure_says_to_install_wheel(tmp_path: Path) -> None:
    # setuptools before 70.1 builds wheels only with the `wheel` package: pip then
    # says "invalid command 'bdist_wheel'", which is what a plain venv gives.
    from pygirder.cloud import artifacts

    project = setuptools_project(tmp_path)
    fake_pip = tmp_path / "fake_pip.py"
    fake_pip.write_text(
        "import sys\nprint(\"error: invalid command 'bdist_wheel'\", file=sys.stderr)\n"
        "sys.exit(1)\n"
    )
    real_run = subprocess.run

    def run(cmd, **kwargs):  # the same pip command line, answered by the failing build
        assert cmd[1:4] == ["-m", "pip", "wheel"] and "--no-build-isolation" in cmd
        return real_run([sys.executable, str(fake_pip)], **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(artifacts.subprocess, "run", run)
        with pytest.raises(ArtifactError, match=r"install `wheel` \(pip install wheel\)"):
            build_artifact(project, tmp_path / "out", offline=True)


def test_push_is_idempotent(tmp_path: Path, bucket: str) -> None:
    import boto3

    artifact = build_artifact(make_project(tmp_path), tmp_path / "out")
    uri = push_artifact(artifact, bucket)
    assert uri == f"s3://{bucket}/artifacts/{artifact.sha256}.tar.gz"
    assert push_artifact(artifact, bucket) == uri
    s3 = boto3.client("s3")
    versions = s3.list_object_versions(Bucket=bucket)["Versions"]
    assert len(versions) == 1, "the second push uploaded again"
    head = s3.head_object(Bucket=bucket, Key=parse_s3_uri(uri)[1])
    assert head["Metadata"]["sha256"] == artifact.sha256
    assert head["Metadata"]["project"] == "pricing"
    [listed] = list_artifacts(bucket)
    assert (listed["uri"], listed["sha256"], listed["project"]) == (uri, artifact.sha256, "pricing")


def test_push_refuses_a_key_holding_another_hash(tmp_path: Path, bucket: str) -> None:
    import boto3

    artifact = build_artifact(make_project(tmp_path), tmp_path / "out")
    key = f"artifacts/{artifact.name}"
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=b"x", Metadata={"sha256": "0" * 64})
    with pytest.raises(ArtifactError, match="someone wrote to the artifact prefix"):
        push_artifact(artifact, bucket)


def _fetch_cli(uri: str, sha256: str, venv: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pygirder.cloud.instance.agent", "fetch-artifact", uri,
         "--sha256", sha256, "--venv", str(venv)],
        capture_output=True, text=True, timeout=120, env=dict(os.environ), check=False,
    )  # fmt: skip


def test_fetch_installs_the_project_and_its_pygirder(tmp_path: Path, bucket: str) -> None:
    artifact = build_artifact(make_project(tmp_path), tmp_path / "out")
    uri = push_artifact(artifact, bucket)
    venv = tmp_path / "home" / "pygirder" / "venv"
    proc = _fetch_cli(uri, artifact.sha256, venv)
    assert proc.returncode == 0, proc.stderr
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import gridjobs, models, pygirder.cloud.instance.agent as a, typer;"
         "print(gridjobs.price(1, 2), models.RATE, a.__file__)"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    price, rate, agent_file = probe.stdout.split()
    assert (price, rate) == ("12", "0.05")
    assert agent_file.startswith(str(venv)), "the artifact's pygirder must shadow the image's"
    assert (venv / "lib").exists()
    assert not (venv / "lib" / "python3.11" / "site-packages" / "tests").exists()
    leftovers = [p.name for p in venv.parent.iterdir() if p.name != "venv"]
    assert leftovers == []
    # A reboot runs the same user-data: the same artifact is not installed twice.
    again = install_artifact(uri, artifact.sha256, venv)
    assert again["project"]["name"] == "pricing"


def test_fetch_refuses_a_tampered_object(tmp_path: Path, bucket: str) -> None:
    import boto3

    artifact = build_artifact(make_project(tmp_path), tmp_path / "out")
    uri = push_artifact(artifact, bucket)
    tampered = bytearray(artifact.path.read_bytes())
    tampered[len(tampered) // 2] ^= 0xFF
    boto3.client("s3").put_object(
        Bucket=bucket, Key=parse_s3_uri(uri)[1], Body=bytes(tampered),
        Metadata={"sha256": artifact.sha256},
    )  # fmt: skip
    home = tmp_path / "home"
    proc = _fetch_cli(uri, artifact.sha256, home / "venv")
    assert proc.returncode == 1
    assert "refusing to install it" in proc.stderr
    assert artifact.sha256 in proc.stderr
    assert list(home.iterdir()) == [], "nothing may be left half-installed"

    with pytest.raises(ArtifactIntegrityError) as info:
        install_artifact(uri, artifact.sha256, home / "venv")
    assert info.value.expected == artifact.sha256 != info.value.actual


def test_fetch_fails_clearly_on_a_missing_object_or_bad_hash(tmp_path: Path, bucket: str) -> None:
    missing = f"s3://{bucket}/artifacts/{'0' * 64}.tar.gz"
    with pytest.raises(ArtifactError, match="cannot download"):
        install_artifact(missing, "0" * 64, tmp_path / "venv")
    with pytest.raises(ArtifactError, match="64 hex digits"):
        install_artifact(missing, "abc", tmp_path / "venv")
    with pytest.raises(ArtifactError, match="not an S3 URI"):
        install_artifact("https://example.invalid/a.tar.gz", "0" * 64, tmp_path / "venv")
    assert not (tmp_path / "venv").exists()


def test_the_artifact_cli_pushes_once_and_lists(tmp_path: Path, bucket: str) -> None:
    from typer.testing import CliRunner

    from pygirder.cloud.cli.artifact import app

    project = make_project(tmp_path)
    runner = CliRunner()
    first = runner.invoke(app, ["push", str(project), "--bucket", bucket, "--json"])
    assert first.exit_code == 0, first.output
    pushed = json.loads(first.stdout)
    assert pushed["uri"] == f"s3://{bucket}/artifacts/{pushed['sha256']}.tar.gz"
    again = runner.invoke(app, ["push", str(project), "--bucket", bucket])
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines()[:2] == [pushed["uri"], f"sha256 {pushed['sha256']}"]
    listed = runner.invoke(app, ["list", "--bucket", bucket, "--json"])
    assert [a["uri"] for a in json.loads(listed.stdout)] == [pushed["uri"]]
    table = runner.invoke(app, ["list", "--bucket", bucket])
    assert pushed["sha256"][:12] in table.stdout


def test_the_artifact_cli_reports_errors(tmp_path: Path, bucket: str, monkeypatch) -> None:
    from typer.testing import CliRunner

    from pygirder.cloud.cli.artifact import app

    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["push", str(tmp_path / "empty"), "--bucket", bucket])
    assert result.exit_code == 1
    assert "no Python modules found" in result.output
    # Without --bucket the bucket comes from the account setup, which needs a config.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYGIRDER_CONFIG", raising=False)
    result = CliRunner().invoke(app, ["push", str(make_project(tmp_path))])
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and "pygirder.toml" in result.output


REPO = Path(__file__).resolve().parents[3]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_push_from_a_plain_venv_with_only_pygirder_cloud(tmp_path: Path, bucket: str) -> None:
    """What a new user has: `python -m venv`, then `pip install -e '.[cloud]'`: no `wheel`,
    no `build`, and a setuptools project of their own."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python, cli = venv / "bin" / "python", venv / "bin" / "pygirder"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "-e", f"{REPO}[cloud]"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    work = tmp_path / "work"  # where the user runs it: a build/ folder is no `build` package
    (work / "build").mkdir(parents=True)
    has = (
        "import importlib.metadata as m\n"
        "for name in ('wheel', 'build'):\n"
        "    try:\n        m.distribution(name)\n        print(name)\n"
        "    except m.PackageNotFoundError:\n        pass\n"
    )
    installed = subprocess.run([str(python), "-c", has], capture_output=True, text=True,
                               check=True, cwd=work).stdout  # fmt: skip
    assert installed == ""
    project = setuptools_project(tmp_path)

    # `python -m pygirder` puts the current folder first on sys.path.
    dry = subprocess.run([str(python), "-m", "pygirder", "cloud", "artifact", "push",
                          str(project), "--dry-run", "--json"], capture_output=True, text=True,
                         check=False, cwd=work)  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    built = json.loads(dry.stdout)
    assert built["uploaded"] is False and built["uri"].startswith("s3://<bucket>/artifacts/")
    assert built["manifest"]["project"] == {"name": "pricing-models", "version": "0.3.0"}

    push = [str(cli), "cloud", "artifact", "push", str(project), "--bucket", bucket, "--json"]
    pushed = subprocess.run(push, capture_output=True, text=True, check=False, cwd=work)
    assert pushed.returncode == 0, pushed.stderr
    uri = json.loads(pushed.stdout)["uri"]
    assert uri == f"s3://{bucket}/artifacts/{built['sha256']}.tar.gz"  # the same bytes
    assert [a["uri"] for a in list_artifacts(bucket)] == [uri]

    # --offline builds with what this venv has; a setuptools older than 70.1 cannot
    # build wheels without the `wheel` package, and the error says so.
    setuptools = subprocess.run(
        [str(python), "-c", "import setuptools; print(setuptools.__version__)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    offline = subprocess.run([str(cli), "cloud", "artifact", "push", str(project),
                              "--dry-run", "--offline"], capture_output=True, text=True,
                             check=False, cwd=work)  # fmt: skip
    if tuple(int(p) for p in setuptools.split(".")[:2]) < (70, 1):
        assert offline.returncode == 1
        assert "install `wheel` (pip install wheel)" in offline.stderr, offline.stderr
        assert "or drop --offline" in offline.stderr and "Traceback" not in offline.stderr
    else:
        assert offline.returncode == 0, offline.stderr
