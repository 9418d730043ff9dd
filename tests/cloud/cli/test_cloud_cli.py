"""``pygirder cloud ...`` as a user runs it (the Typer app, against moto)."""

from __future__ import annotations

import json
import stat
import tomllib
from pathlib import Path

import pytest
from cloud_helpers import EXPECTED_AFTER_SETUP, PUBLIC_KEY, counts, inventory
from typer.testing import CliRunner

from pygirder.cloud.cli import app
from pygirder.cloud.config import load_config
from pygirder.cloud.policy import boundary_policy, operator_policy
from pygirder.cloud.tags import TAG_FLEET, TAG_MANAGED, TAG_NAME


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("COLUMNS", "160")  # wide enough for readable tables

    def invoke(*args: str):
        return CliRunner().invoke(app, list(args), catch_exceptions=False)

    return invoke


@pytest.fixture
def toml(tmp_path: Path) -> Path:
    """A ready pygirder.toml for setup "t" whose key files live in tmp_path."""
    (tmp_path / "me.pub").write_text(PUBLIC_KEY + "\n")
    path = tmp_path / "pygirder.toml"
    path.write_text(
        '[cloud]\nname = "t"\nssh_from = "198.51.100.7/32"\npublic_key_file = "me.pub"\n'
        'cluster_key_file = "keys/cluster.pem"\n'
    )
    return path


def test_init_writes_a_commented_config(run, tmp_path: Path) -> None:
    path = tmp_path / "pygirder.toml"
    result = run("init", "--config", str(path), "--name", "lab", "--region", "eu-west-1")
    assert result.exit_code == 0, result.output
    assert "ssh_from" in result.stderr  # the next step is named
    config = load_config(path)
    assert (config.name, config.region, config.zone) == ("lab", "eu-west-1", "eu-west-1a")
    assert config.ssh_from == ""
    assert "# " in path.read_text()

    again = run("init", "--config", str(path))
    assert again.exit_code == 2
    assert "already has a [cloud] table" in again.stderr


def test_init_keeps_other_tables_and_force_replaces_only_cloud(run, tmp_path: Path) -> None:
    path = tmp_path / "pygirder.toml"
    path.write_text("[grid]\nworkers = 3\n")
    assert run("init", "--config", str(path)).exit_code == 0
    result = run("init", "--config", str(path), "--force", "--ssh-from", "192.0.2.1")
    assert result.exit_code == 0, result.output
    data = tomllib.loads(path.read_text())
    assert data["grid"] == {"workers": 3}
    assert data["cloud"]["ssh_from"] == "192.0.2.1"
    assert path.read_text().count("[cloud]") == 1
    assert load_config(path).ssh_from == "192.0.2.1/32"


def test_init_rejects_a_bad_ssh_source(run, tmp_path: Path) -> None:
    path = tmp_path / "pygirder.toml"
    result = run("init", "--config", str(path), "--ssh-from", "0.0.0.0/0")
    assert result.exit_code == 2
    assert "whole internet" in result.stderr
    assert not path.exists()


def test_policy_prints_pipeable_json(run, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PYGIRDER_CONFIG", str(tmp_path / "none.toml"))
    result = run("policy")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == operator_policy()
    assert "aws iam create-policy" in result.stderr
    boundary = run("policy", "--boundary")
    assert boundary.exit_code == 0
    assert json.loads(boundary.stdout) == boundary_policy()


def test_a_broken_config_is_explained(run, tmp_path: Path) -> None:
    path = tmp_path / "pygirder.toml"
    path.write_text('[cloud]\nnat = "box"\n')
    result = run("plan", "--config", str(path))
    assert result.exit_code == 2
    assert "nat = 'box'" in result.stderr and "'instance' or 'gateway'" in result.stderr


@pytest.mark.slow
def test_setup_status_teardown_from_the_command_line(run, toml: Path, aws, boto) -> None:
    planned = run("plan", "--config", str(toml))
    assert planned.exit_code == 0, planned.output
    assert "pygirder cloud plan" in planned.stdout and "create" in planned.stdout
    assert "24 create" in planned.stderr  # no alert_email: no e-mail subscription
    assert "alert_email is not set" in planned.stderr  # warned, not refused

    done = run("setup", "--config", str(toml))
    assert done.exit_code == 0, done.output
    assert "creating VPC pygirder-t-vpc" in done.stderr  # progress as it goes
    assert "created" in done.stdout
    assert counts(inventory(boto)) == EXPECTED_AFTER_SETUP
    key = toml.parent / "keys" / "cluster.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600

    again = run("setup", "--config", str(toml))
    assert again.exit_code == 0
    assert "Nothing to do" in again.stderr

    shown = run("status", "--config", str(toml))
    assert shown.exit_code == 0, shown.output
    assert "Idle cost" in shown.stdout and "$1.50" in shown.stdout
    assert "stopped" in shown.stdout
    report = json.loads(run("status", "--config", str(toml), "--json").stdout)
    assert report["total_monthly_usd"] == pytest.approx(1.50)
    assert {i["key"] for i in report["items"]} >= {"vpc", "nat-instance", "budget"}

    gone = run("teardown", "--config", str(toml), "--yes")
    assert gone.exit_code == 0, gone.output
    assert "verified: nothing tagged pygirder:name=t is left" in gone.stderr
    assert "deleted" in gone.stdout
    assert sum(counts(inventory(boto)).values()) == 0
    assert not key.exists()


def test_setup_without_ssh_from_exits_with_the_fix(run, toml: Path, aws) -> None:
    toml.write_text(toml.read_text().replace('ssh_from = "198.51.100.7/32"\n', ""))
    result = run("setup", "--config", str(toml))
    assert result.exit_code == 2
    assert "ssh_from is not set" in result.stderr


def test_teardown_wants_confirmation(run, toml: Path, aws) -> None:
    result = run("teardown", "--config", str(toml))  # stdin is not a terminal here
    assert result.exit_code == 2
    assert "--yes" in result.stderr


@pytest.mark.slow
def test_teardown_refuses_with_a_live_fleet(run, toml: Path, aws, boto) -> None:
    assert run("setup", "--config", str(toml)).exit_code == 0
    tags = [
        {"Key": TAG_MANAGED, "Value": "true"},
        {"Key": TAG_NAME, "Value": "t"},
        {"Key": TAG_FLEET, "Value": "f-9"},
    ]
    boto("ec2").run_instances(
        ImageId="ami-12c6146b",
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
    )
    refused = run("teardown", "--config", str(toml), "--yes")
    assert refused.exit_code == 1
    assert "still alive" in refused.stderr and "--force" in refused.stderr
    forced = run("teardown", "--config", str(toml), "--yes", "--force")
    assert forced.exit_code == 0, forced.output


def test_conflicts_fail_plan_and_setup(run, toml: Path, aws, boto) -> None:
    boto("iam").create_role(RoleName="pygirder-t-instance", AssumeRolePolicyDocument="{}")
    planned = run("plan", "--config", str(toml))
    assert planned.exit_code == 1
    assert "conflict" in planned.stdout
    refused = run("setup", "--config", str(toml))
    assert refused.exit_code == 1
    assert "setup stopped before changing anything" in refused.stderr
    assert "not created by pygirder" in refused.stdout + refused.stderr
