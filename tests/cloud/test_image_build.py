"""``pygirder cloud image build | list | delete`` against moto, with the local data plane running.

The builder that ``image build`` launches is run by the simulator: its user-data, the
bake script, runs in check mode (``PYGIRDER_SIMULATED=1``), downloads the pygirder
wheel through its presigned URL, writes and checks every file under a staging root
and announces through SNS to the status queue, as a real builder would.  What exists
afterwards is checked with independent boto3 clients.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pygirder.cloud import instance as instance_package
from pygirder.cloud.account import setup
from pygirder.cloud.cli import app
from pygirder.cloud.errors import CloudConfigError
from pygirder.cloud.image import (
    ImageError,
    build_image,
    delete_images,
    latest_image,
    list_images,
    render_bake_script,
)
from pygirder.cloud.image import build as image_module
from pygirder.cloud.sim.simulator import SimState, Simulator
from pygirder.cloud.tags import TAG_COMPONENT, TAG_MANAGED, TAG_NAME, TAG_ROLE, from_tag_list

SHELLCHECK = Path(sys.executable).parent / "shellcheck"
SRC = Path(instance_package.__file__).parent
SHA = "ab" * 32
RENDER = dict(
    build_id="image-20300101-000000-abcdef",
    topic_arn="arn:aws:sns:us-east-1:123456789012:pygirder-t-status",
    wheel_url="http://127.0.0.1:5000/b/artifacts/image/x/pygirder-0.1.0-py3-none-any.whl"
    "?X-Amz-Signature=abc&X-Amz-Expires=3600",
    wheel_name="pygirder-0.1.0-py3-none-any.whl",
    wheel_sha256=SHA,
)


def shellcheck(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SHELLCHECK), "--shell=bash", "--severity=style", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


# -- the scripts ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["image-bake.sh", "pygirder-boot.sh"])
def test_templates_are_shellcheck_clean(name: str) -> None:
    result = shellcheck(SRC / name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rendered_bake_script_is_shellcheck_clean_and_carries_the_boot_robot(
    tmp_path: Path,
) -> None:
    script = render_bake_script(**RENDER)
    assert not re.search(r"@[A-Z_]+@", script)
    assert "readonly BUILD_ID=image-20300101-000000-abcdef\n" in script
    assert "readonly WHEEL_URL='http://127.0.0.1:5000/b/" in script  # quoted: it holds '&'
    assert 'exec "$USER_DATA"' in script  # the boot robot, embedded whole
    assert len(script.encode()) < 16384
    path = tmp_path / "bake.sh"
    path.write_text(script)
    result = shellcheck(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0


def test_bad_render_values_are_refused() -> None:
    with pytest.raises(CloudConfigError, match="Amazon Linux Python package"):
        render_bake_script(**RENDER, python_package="python3; rm -rf /")
    with pytest.raises(ImageError, match="64 lowercase hex"):
        render_bake_script(**{**RENDER, "wheel_sha256": "abc"})


# -- building against moto and the data plane -------------------------------------------------
@pytest.fixture
def account(make_aws, config) -> tuple[Any, Any]:
    """A set-up account (config, aws) whose EC2 calls are recorded with their parameters."""
    aws_, faults, _ = make_aws(config)
    setup(config, aws=aws_)
    aws_.faults, aws_.after_setup = faults, len(faults.calls)
    calls: list[tuple[str, dict[str, Any]]] = []

    def record(model: Any, params: dict[str, Any], **_: Any) -> None:
        calls.append((model.name, dict(params)))

    aws_.client("ec2").meta.events.register("provide-client-params.ec2", record)
    aws_.recorded = calls
    return config, aws_


@pytest.fixture
def sim(aws: Any, tmp_path: Path) -> Iterator[Simulator]:
    with Simulator(aws.url, tmp_path / "sim", name="t", poll_interval=0.2, stop_grace=2) as s:
        yield s


def test_build_makes_a_tagged_imdsv2_image_and_leaves_no_builder(
    account, sim: Simulator, boto
) -> None:
    config, aws_ = account
    said: list[str] = []
    result = build_image(config, aws=aws_, progress=said.append, bake_timeout=60)
    ec2 = boto("ec2")

    [image] = ec2.describe_images(ImageIds=[result.image_id])["Images"]
    tags = from_tag_list(image["Tags"])
    assert tags[TAG_MANAGED] == "true" and tags[TAG_NAME] == "t"
    assert tags[TAG_COMPONENT] == "image" and tags["Name"] == result.name
    assert result.name.startswith("pygirder-t-") and result.architecture == "x86_64"
    assert result.detail.startswith("check mode: pygirder ")
    assert result.snapshot_ids
    for snapshot in ec2.describe_snapshots(SnapshotIds=result.snapshot_ids)["Snapshots"]:
        assert from_tag_list(snapshot["Tags"])[TAG_NAME] == "t"
    imds = [p for op, p in aws_.recorded if op == "ModifyImageAttribute"]
    assert imds == [{"ImageId": result.image_id, "ImdsSupport": {"Value": "v2.0"}}]

    [builder] = [
        i
        for r in ec2.describe_instances(InstanceIds=[result.builder_id])["Reservations"]
        for i in r["Instances"]
    ]
    assert builder["State"]["Name"] == "terminated"
    assert builder["MetadataOptions"]["HttpTokens"] == "required"
    assert from_tag_list(builder["Tags"])[TAG_ROLE] == "image-builder"
    assert not result.builder_kept

    # The data plane ran the bake script in check mode: every file was written and checked.
    ran = sim.wait_for(result.builder_id, SimState.TERMINATED, timeout=10)
    root = ran.home / "pygirder-bake" / "root"
    unit = (root / "etc/systemd/system/pygirder-boot.service").read_text()
    assert "User=pygirder" in unit and f"ExecStart={root}/usr/local/libexec/pygirder-boot" in unit
    robot = (root / "usr/local/libexec/pygirder-boot").read_text()
    assert robot == (SRC / "pygirder-boot.sh").read_text()
    sudoers = (root / "etc/sudoers.d/pygirder").read_text()
    assert "pygirder ALL=(root) NOPASSWD: /usr/sbin/shutdown -h now" in sudoers
    assert "allow_userdata: false" in (root / "etc/cloud/cloud.cfg.d/99-pygirder.cfg").read_text()
    assert "scripts-user" not in (root / "etc/cloud/cloud.cfg").read_text()
    bake_log = (root / "var/log/pygirder/bake.log").read_text()
    assert "check mode, not run: dnf install" in bake_log and "Valkey: " in bake_log
    assert not list((root / "var/tmp/pygirder-bake").iterdir())  # the wheel was cleaned up

    assert latest_image(config, aws=aws_)["image_id"] == result.image_id
    assert latest_image(config, aws=aws_, architecture="arm64") is None
    runner = CliRunner()
    toml = _toml(config)
    listed = runner.invoke(app, ["image", "list", "--config", toml, "--json"])
    assert listed.exit_code == 0, listed.output
    assert [i["image_id"] for i in json.loads(listed.stdout)["images"]] == [result.image_id]

    deleted = runner.invoke(app, ["image", "delete", result.image_id, "--config", toml, "--yes"])
    assert deleted.exit_code == 0, deleted.output
    assert ec2.describe_images(Owners=["self"])["Images"] == []
    left = ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]
    assert not {s["SnapshotId"] for s in left} & set(result.snapshot_ids)


def test_an_arm64_image_is_baked_on_a_graviton_builder_from_the_arm64_base(
    account, sim: Simulator, boto
) -> None:
    config, aws_ = account
    built = CliRunner().invoke(
        app, ["image", "build", "--config", _toml(config), "--arch", "arm64", "--timeout", "1",
              "--json"],
    )  # fmt: skip
    assert built.exit_code == 0, built.output
    result = json.loads(built.stdout)
    assert result["architecture"] == "arm64" and "-arm64-" in result["name"]
    ec2 = boto("ec2")
    expected = boto("ssm").get_parameter(
        Name="/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64"
    )["Parameter"]["Value"]
    assert result["base_image_id"] == expected
    [builder] = ec2.describe_instances(InstanceIds=[result["builder_id"]])["Reservations"][0][
        "Instances"
    ]
    assert builder["InstanceType"] == "t4g.small" and builder["ImageId"] == expected
    [image] = ec2.describe_images(ImageIds=[result["image_id"]])["Images"]
    assert image["Architecture"] == "arm64"
    assert latest_image(config, aws=aws_, architecture="arm64")["image_id"] == result["image_id"]
    assert latest_image(config, aws=aws_, architecture="x86_64") is None
    # A builder of the other architecture is refused before anything is launched.
    with pytest.raises(CloudConfigError, match=r"t3\.small is x86_64, not arm64"):
        build_image(config, aws=aws_, architecture="arm64", instance_type="t3.small")
    with pytest.raises(CloudConfigError, match="x86_64 or arm64"):
        build_image(config, aws=aws_, architecture="sparc")


@pytest.mark.slow
def test_the_cli_keeps_the_builder_stopped_and_protected(account, sim: Simulator, boto) -> None:
    config, aws_ = account
    toml = _toml(config)
    runner = CliRunner()
    built = runner.invoke(
        app, ["image", "build", "--config", toml, "--keep-builder", "--timeout", "1", "--json"]
    )
    assert built.exit_code == 0, built.output
    result = json.loads(built.stdout)
    assert result["builder_kept"] and result["image_id"].startswith("ami-")
    ec2 = boto("ec2")
    assert ec2_state(ec2, result["builder_id"]) == "stopped"
    protection = ec2.describe_instance_attribute(
        InstanceId=result["builder_id"], Attribute="disableApiTermination"
    )
    assert protection["DisableApiTermination"]["Value"] is True
    assert sim.wait_for(result["builder_id"], SimState.STOPPED, timeout=10).pid is None

    listed = runner.invoke(app, ["image", "list", "--config", toml])
    assert listed.exit_code == 0, listed.output
    assert f"builder {result['builder_id']} is stopped" in " ".join(listed.stderr.split())
    refused = runner.invoke(app, ["image", "delete", "--all", "--config", toml])
    assert refused.exit_code == 2 and "--yes" in refused.stderr
    deleted = runner.invoke(app, ["image", "delete", "--all", "--config", toml, "--yes"])
    assert deleted.exit_code == 0, deleted.output
    assert ec2_state(ec2, result["builder_id"]) == "terminated"
    assert list_images(config, aws=aws_) == []


@pytest.mark.slow
def test_a_failed_bake_is_reported_and_cleaned_up(
    account, sim: Simulator, boto, monkeypatch
) -> None:
    config, aws_ = account
    upload = image_module._upload_wheel

    def wrong_hash(*args: Any, **kwargs: Any) -> tuple[str, str, str]:
        name, _, url = upload(*args, **kwargs)
        return name, "0" * 64, url  # the builder downloads a wheel that does not match

    monkeypatch.setattr(image_module, "_upload_wheel", wrong_hash)
    with pytest.raises(ImageError, match=r"bake on builder .* failed: bake failed at line"):
        build_image(config, aws=aws_, bake_timeout=60)
    ec2 = boto("ec2")
    assert ec2.describe_images(Owners=["self"])["Images"] == []
    builders = [
        i
        for r in ec2.describe_instances(
            Filters=[{"Name": f"tag:{TAG_ROLE}", "Values": ["image-builder"]}]
        )["Reservations"]
        for i in r["Instances"]
    ]
    assert [b["State"]["Name"] for b in builders] == ["terminated"]
    log = sim.instance(builders[0]["InstanceId"]).home / "pygirder-bake/root/var/log"
    assert "refusing to install it" in (log / "pygirder/bake.log").read_text()


@pytest.mark.slow
def test_every_image_call_is_covered_by_the_operator_policy(account, sim: Simulator) -> None:
    from pygirder.cloud.policy import allows_action, iam_action, operator_policy

    config, aws_ = account
    result = build_image(config, aws=aws_, keep_builder=True, bake_timeout=60)
    list_images(config, aws=aws_)
    delete_images(config, [result.image_id, result.builder_id], aws=aws_)
    calls = aws_.faults.calls[aws_.after_setup :]
    used = sorted({iam_action(*call.split(".")) for call in calls})
    assert "ec2:CreateImage" in used and "ec2:DeleteSnapshot" in used
    policy = operator_policy()
    assert [a for a in used if not allows_action(policy, a)] == []


def test_delete_refuses_what_is_not_ours(account, boto) -> None:
    config, aws_ = account
    with pytest.raises(ImageError, match="no image"):
        delete_images(config, ["ami-0000000000000dead"], aws=aws_)
    ec2 = boto("ec2")
    other = ec2.run_instances(ImageId="ami-0123456789abcdef0", MinCount=1, MaxCount=1)
    iid = other["Instances"][0]["InstanceId"]
    with pytest.raises(ImageError, match="not an image builder"):
        delete_images(config, [iid], aws=aws_)
    assert ec2_state(ec2, iid) == "running"


def ec2_state(ec2: Any, instance_id: str) -> str:
    reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return reservations[0]["Instances"][0]["State"]["Name"]


def _toml(config: Any) -> str:
    """A pygirder.toml for ``config`` next to its key files."""
    path = Path(config.public_key_file).parent / "pygirder.toml"
    path.write_text(
        f'[cloud]\nname = "{config.name}"\nssh_from = "{config.ssh_from}"\n'
        f'public_key_file = "{config.public_key_file}"\n'
        f'cluster_key_file = "{config.cluster_key_file}"\n'
    )
    return str(path)
