"""The user-data script: shellcheck-clean, secret-free, and it boots a simulated instance.

The end-to-end tests run the rendered script the way the image's boot robot does:
fetched from IMDS with a token, run by bash as an unprivileged user (uid 65534 via
``setpriv``) with its own HOME, against the IMDS emulator and moto.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pygirder.cloud.artifacts import build_artifact, push_artifact
from pygirder.cloud.instance import agent
from pygirder.cloud.instance.userdata import render_user_data
from pygirder.cloud.sim.imds import ImdsEmulator
from pygirder.errors import ConfigError

SHELLCHECK = Path(sys.executable).parent / "shellcheck"
SHA = "ab" * 32
EXPIRES = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
BASE = dict(
    topic_arn="arn:aws:sns:us-east-1:123456789012:pygirder-status",
    region="us-east-1",
    launch_id="L-20300101-1",
    fleet="f-1",
    name="demo",
    artifact_uri=f"s3://pygirder-artifacts/artifacts/{SHA}.tar.gz",
    artifact_sha256=SHA,
    expires=EXPIRES,
)
ROLES = {
    "redis": dict(role="redis"),
    "distributor": dict(
        role="distributor", redis="redis://10.0.1.5:6379/0", pool="rack-1", parent="default"
    ),
    "worker": dict(role="worker", redis="redis://10.0.1.5:6379/0", imports=["jobs", "lib.more"]),
    "redis with controller": dict(
        role="redis",
        controller_queue_url="https://sqs.us-east-1.amazonaws.com/123456789012/pygirder-s",
    ),
}


def _shellcheck(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "user-data.sh"
    path.write_text(script)
    return subprocess.run(
        [str(SHELLCHECK), "--shell=bash", "--severity=style", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("role", sorted(ROLES))
def test_user_data_passes_shellcheck(role: str, tmp_path: Path) -> None:
    script = render_user_data(**BASE, **ROLES[role])
    assert script.startswith("#!/bin/bash\n")
    assert "set -Eeuo pipefail" in script
    assert "trap 'on_error $LINENO' ERR" in script
    result = _shellcheck(script, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_user_data_holds_the_launch_settings_and_no_secrets() -> None:
    script = render_user_data(**BASE, **ROLES["worker"])
    needles = [BASE["topic_arn"], BASE["launch_id"], SHA, "2030-01-01T12:00:00Z",
               "--import jobs", "--import lib.more", "--redis redis://10.0.1.5:6379/0"]  # fmt: skip
    for needle in needles:
        assert needle in script
    lowered = script.lower()
    for secret in ("aws_secret", "aws_access_key", "aws_session_token", "requirepass", "://:"):
        assert secret not in lowered
    assert "--port 6379" in render_user_data(**BASE, **ROLES["redis"])
    # workers keep durable results next to the artifacts, where every fleet finds them
    bucket = BASE["artifact_uri"][len("s3://") :].split("/")[0]
    assert f"--store s3://{bucket}/results" in script
    assert "--store" not in render_user_data(**BASE, **ROLES["redis"])
    assert "--controller-queue-url" not in render_user_data(**BASE, **ROLES["redis"])
    with_controller = render_user_data(**BASE, **ROLES["redis with controller"])
    assert "--controller-queue-url https://sqs.us-east-1.amazonaws.com/" in with_controller


def test_ttl_is_made_absolute_at_render_time() -> None:
    settings = {k: v for k, v in BASE.items() if k != "expires"}
    script = render_user_data(**settings, **ROLES["redis"], ttl=3600)
    line = next(x for x in script.splitlines() if x.startswith("readonly EXPIRES="))
    expires = datetime.fromisoformat(line.split("=", 1)[1].replace("Z", "+00:00"))
    assert 3590 < (expires - datetime.now(UTC)).total_seconds() <= 3600


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(role="worker"), "needs redis="),
        (dict(role="distributor", redis="redis://h:1/0"), "needs parent="),
        (dict(role="worker", redis="redis://:pw@h:1/0"), "must not hold a password"),
        (dict(role="redis", artifact_sha256="abc"), "64 lowercase hex"),
        (dict(role="redis", artifact_uri="https://x/y"), "s3:// URI"),
        (dict(role="redis", launch_id="L; rm -rf ~"), "may hold only"),
        (dict(role="redis", expires=None), "exactly one of ttl= and expires="),
        (dict(role="redis", ttl=60), "exactly one of ttl= and expires="),
        (dict(role="nonsense"), "is not a valid Role"),
    ],
)
def test_bad_settings_are_refused(change: dict, message: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=message):
        render_user_data(**{**BASE, **change})


# -- running it -------------------------------------------------------------------------------
def _unprivileged() -> list[str]:
    """Prefix that runs a command as uid/gid 65534, or [] where that is not possible.

    The one capability kept, CAP_DAC_READ_SEARCH, lets the service user read this
    test interpreter, which may live under /root (mode 0700); it grants no writes,
    so the script still proves it needs nothing but its HOME.
    """
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        return []
    prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
              "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]  # fmt: skip
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", "import os, sys, pygirder.cloud.instance.agent; "
         "print(os.getuid(), sys.version)"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return prefix if probe.stdout.strip() == f"65534 {sys.version}" else []


@pytest.fixture
def instance_home() -> Iterator[Path]:
    """A HOME the service user owns (outside pytest's root-only tmp tree)."""
    home = Path(tempfile.mkdtemp(prefix="pygirder-home-"))
    if os.geteuid() == 0:
        os.chown(home, 65534, 65534)
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _boot(emulator: ImdsEmulator, home: Path, extra_env: dict[str, str]) -> subprocess.Popen:
    """What the boot robot does: fetch the user-data through IMDSv2 and run it."""
    token_req = urllib.request.Request(
        emulator.url + "/latest/api/token", method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
    )  # fmt: skip
    with urllib.request.urlopen(token_req, timeout=5) as resp:
        token = resp.read().decode()
    data_req = urllib.request.Request(
        emulator.url + "/latest/user-data", headers={"X-aws-ec2-metadata-token": token}
    )
    with urllib.request.urlopen(data_req, timeout=5) as resp:
        script = home / "user-data"
        script.write_bytes(resp.read())
    script.chmod(0o755)
    env = {
        **os.environ, **emulator.env(), **extra_env,
        "HOME": str(home), "PYGIRDER_PYTHON": sys.executable,
    }  # fmt: skip
    env.pop("PYTHONPATH", None)
    return subprocess.Popen(
        [*_unprivileged(), "/bin/bash", str(script)], env=env, cwd=home,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


def _project(root: Path) -> Path:
    project = root / "jobs"
    project.mkdir()
    (project / "jobs.py").write_text("def double(x):\n    return 2 * x\n")
    return project


@pytest.fixture
def pushed(aws, tmp_path: Path) -> tuple[str, str]:
    import boto3

    boto3.client("s3").create_bucket(Bucket="pygirder-artifacts")
    artifact = build_artifact(_project(tmp_path), tmp_path / "out")
    return push_artifact(artifact, "pygirder-artifacts"), artifact.sha256


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _finish(proc: subprocess.Popen, timeout: float = 60) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


@pytest.mark.slow
def test_user_data_boots_a_redis_instance_end_to_end(status, pushed, instance_home) -> None:
    import boto3
    import redis

    uri, sha = pushed
    password = "boot-test-password-0123456789"
    boto3.client("ssm").put_parameter(
        Name=agent.redis_password_parameter("demo", "f-1"), Value=password, Type="SecureString"
    )
    port = _free_port()
    script = render_user_data(
        **{**BASE, "topic_arn": status.topic_arn, "artifact_uri": uri, "artifact_sha256": sha},
        role="redis", port=port, spot_interval_s=0.5,
    )  # fmt: skip
    marker = instance_home / "shut-down"
    with ImdsEmulator(user_data=script, instance_id="i-0e2e000000000001") as emulator:
        proc = _boot(emulator, instance_home, {"PYGIRDER_SHUTDOWN_COMMAND": f"touch {marker}"})
        try:
            up, _ = status.wait_for("up", timeout=30)
            ready, _ = status.wait_for("ready", timeout=60)
            client = redis.Redis(host="127.0.0.1", port=port, password=password)
            assert client.ping()
            client.close()
            emulator.raise_spot_interruption("terminate", in_seconds=120)
            going, _ = status.wait_for("going-away", timeout=30)
            assert _finish(proc) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for message in (up, ready, going):
        assert (message.instance_id, message.launch_id, message.role, message.fleet) == (
            "i-0e2e000000000001", BASE["launch_id"], "redis", "f-1",
        )  # fmt: skip
    assert going.detail.startswith("spot interruption notice: terminate")
    log = (instance_home / "pygirder" / "boot.log").read_text()
    assert "pygirder boot: role redis" in log
    assert "artifact installed: jobs 0.0.0, pygirder" in log
    assert password not in log
    assert not marker.exists(), "a spot interruption is not a time-to-live"
    venv_python = instance_home / "pygirder" / "venv" / "bin" / "python"
    assert venv_python.exists()
    if _unprivileged():
        assert (instance_home / "pygirder" / "boot.log").stat().st_uid == 65534
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    with pytest.raises(redis.ConnectionError):
        redis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0)).ping()


def test_a_failed_boot_announces_failed_and_shuts_down_at_its_ttl(
    status, pushed, instance_home
) -> None:
    uri, _ = pushed
    wrong = "0" * 64  # the user-data names another artifact than the one on S3
    script = render_user_data(
        **{**BASE, "topic_arn": status.topic_arn, "artifact_uri": uri, "artifact_sha256": wrong,
           "expires": datetime.now(UTC) - timedelta(seconds=1)},
        role="redis",
    )  # fmt: skip
    marker = instance_home / "shut-down"
    with ImdsEmulator(user_data=script) as emulator:
        proc = _boot(emulator, instance_home, {"PYGIRDER_SHUTDOWN_COMMAND": f"touch {marker}"})
        status_code = _finish(proc)
    assert status_code == 1
    events = status.receive(3)
    assert [m.event for m in events] == ["up", "failed", "going-away"]
    assert "boot script failed at line" in events[1].detail
    assert marker.exists()
    log = (instance_home / "pygirder" / "boot.log").read_text()
    assert "refusing to install it" in log
    assert not (instance_home / "pygirder" / "venv").exists()
