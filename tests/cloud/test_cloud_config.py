"""[cloud] configuration: defaults, loading, and errors that name key, value, fix."""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pygirder.cloud.config import (
    CONFIG_ENV,
    CloudConfig,
    CloudConfigError,
    config_from_dict,
    default_config_text,
    load_config,
)
from pygirder.errors import ConfigError


def test_the_init_template_is_valid_and_commented() -> None:
    text = default_config_text(name="demo", region="eu-west-2")
    config = config_from_dict(tomllib.loads(text)["cloud"])
    assert config.name == "demo"
    assert config.zone == "eu-west-2a"
    assert config.nat == "instance"
    assert config.alarm_thresholds_usd == (1.0, 10.0, 100.0)
    assert config.ssh_from == ""  # a clear placeholder that setup refuses
    assert "REQUIRED" in text and "ssh_from" in text
    assert text.count("#") > 15  # every group of keys is explained


def test_setup_refuses_until_ssh_from_is_set() -> None:
    config = config_from_dict({})
    with pytest.raises(CloudConfigError) as info:
        config.require_ssh_source()
    assert "ssh_from" in str(info.value)
    assert "203.0.113.7/32" in str(info.value)  # says what a value looks like
    assert info.value.problems[0][0] == "ssh_from"


def test_the_template_takes_ssh_from() -> None:
    text = default_config_text(ssh_from="192.0.2.10/32")
    config = config_from_dict(tomllib.loads(text)["cloud"])
    assert config.require_ssh_source() == "192.0.2.10/32"


def test_a_bare_address_means_slash_32() -> None:
    assert config_from_dict({"ssh_from": "192.0.2.10"}).ssh_from == "192.0.2.10/32"


def test_ssh_from_anywhere_needs_an_explicit_opt_in_and_warns() -> None:
    with pytest.raises(CloudConfigError) as info:
        config_from_dict({"ssh_from": "0.0.0.0/0"})
    message = str(info.value)
    assert "ssh_from = '0.0.0.0/0'" in message
    assert "allow_ssh_from_anywhere" in message
    config = config_from_dict({"ssh_from": "0.0.0.0/0", "allow_ssh_from_anywhere": True})
    assert config.ssh_from == "0.0.0.0/0"
    assert any("whole internet" in w for w in config.warnings)
    assert config_from_dict({"ssh_from": "192.0.2.0/24"}).warnings == []


@pytest.mark.parametrize("wide", ["10.0.0.0/8", "100.64.0.0/10", "172.16.0.0/15", "128.0.0.0/1"])
def test_ssh_from_wider_than_a_slash_16_needs_the_opt_in(wide: str) -> None:
    with pytest.raises(CloudConfigError) as info:
        config_from_dict({"ssh_from": wide})
    message = str(info.value)
    assert f"ssh_from = '{wide}'" in message
    assert "wider than a /16" in message and "allow_ssh_from_anywhere = true" in message
    assert info.value.problems[0][0] == "ssh_from"
    config = config_from_dict({"ssh_from": wide, "allow_ssh_from_anywhere": True})
    assert config.ssh_from == wide
    assert any(wide in w and "addresses" in w for w in config.warnings)


def test_ssh_from_up_to_a_slash_16_is_fine() -> None:
    config = config_from_dict({"ssh_from": "172.16.0.0/16"})
    assert config.ssh_from == "172.16.0.0/16" and config.warnings == []


@pytest.mark.parametrize(
    ("overrides", "key", "allowed"),
    [
        ({"name": "Bad_Name"}, "name", "lowercase letters"),
        ({"name": "x" * 21}, "name", "1-20 characters"),
        ({"region": "useast1"}, "region", "'us-east-1'"),
        ({"zone": "eu-west-1a"}, "zone", "use e.g. 'us-east-1a'"),
        ({"nat": "nat-box"}, "nat", "'instance' or 'gateway'"),
        ({"ssh_from": "198.51.100.7/24"}, "ssh_from", "did you mean '198.51.100.0/24'"),
        ({"ssh_from": "not-an-address"}, "ssh_from", "CIDR block"),
        ({"ssh_from": "2001:db8::/64"}, "ssh_from", "IPv4"),
        ({"vpc_cidr": "10.0.0.0/8"}, "vpc_cidr", "/16 and /28"),
        ({"vpc_cidr": "8.8.0.0/16"}, "vpc_cidr", "private range"),
        ({"private_subnet_cidr": "10.99.0.0/24"}, "private_subnet_cidr", "inside vpc_cidr"),
        (
            {"public_subnet_cidr": "10.42.128.0/20"},
            "private_subnet_cidr",
            "overlaps public_subnet_cidr",
        ),
        ({"nat_instance_type": "tiny"}, "nat_instance_type", "'t4g.nano'"),
        ({"alarm_thresholds_usd": [1, 1]}, "alarm_thresholds_usd", "distinct"),
        ({"alarm_thresholds_usd": [0, 10]}, "alarm_thresholds_usd", "greater than 0"),
        ({"alarm_thresholds_usd": "10"}, "alarm_thresholds_usd", "list of amounts"),
        ({"budget_usd": -5}, "budget_usd", "greater than 0"),
        ({"alert_email": "nobody"}, "alert_email", "e-mail address"),
        ({"tags": {"aws:cost": "x"}}, "tags", "reserved prefix"),
        ({"tags": {"pygirder:name": "x"}}, "tags", "reserved prefix"),
        ({"artifact_prefix": "/abs/"}, "artifact_prefix", "ending with '/'"),
        ({"artifact_retention_days": 0}, "artifact_retention_days", "greater than or equal"),
        ({"bucket": "Not_A_Bucket"}, "bucket", "valid S3 bucket name"),
        ({"nat_type": "gateway"}, "nat_type", "allowed keys are: name, region"),
    ],
)
def test_invalid_values_name_the_key_the_value_and_what_is_allowed(
    overrides: dict, key: str, allowed: str
) -> None:
    with pytest.raises(CloudConfigError) as info:
        config_from_dict(overrides)
    message = str(info.value)
    assert f"  {key}" in message, message
    assert allowed in message, message
    keys = [problem[0] for problem in info.value.problems]
    assert key in keys
    value = overrides.get(key)
    if isinstance(value, str):
        assert repr(value) in message  # the offending value is shown
    assert isinstance(info.value, ConfigError)  # callers can catch the generic error


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(CloudConfigError) as info:
        config_from_dict({"name": "BAD", "nat": "box", "budget_usd": 0})
    assert {p[0] for p in info.value.problems} == {"name", "nat", "budget_usd"}


def test_names_derived_from_the_config() -> None:
    config = config_from_dict({"name": "bench", "region": "eu-central-1"})
    assert config.resource_name("artifacts") == "pygirder-bench-artifacts"
    assert config.bucket_name("123456789012") == "pygirder-bench-123456789012-eu-central-1"
    assert len(config.bucket_name("123456789012")) <= 63
    assert config_from_dict({"bucket": "my-own-bucket"}).bucket_name("1") == "my-own-bucket"
    assert config.ssm_prefix == "/pygirder/bench/"
    assert (
        config.cluster_key_path == Path("~/.pygirder/keys/pygirder-bench-cluster.pem").expanduser()
    )


def test_the_longest_name_in_the_longest_region_still_makes_a_valid_bucket_name() -> None:
    config = config_from_dict({"name": "a" * 20, "region": "ap-southeast-2", "zone": ""})
    assert len(config.bucket_name("123456789012")) <= 63


def test_load_config_reads_the_cloud_table_and_resolves_paths(tmp_path: Path) -> None:
    (tmp_path / "pygirder.toml").write_text(
        '[grid]\nworkers = 4\n\n[cloud]\nname = "x"\npublic_key_file = "keys/me.pub"\n'
        '[cloud.tags]\nproject = "p"\n'
    )
    config = load_config(tmp_path / "pygirder.toml")
    assert config.name == "x"
    assert config.public_key_path == tmp_path / "keys" / "me.pub"  # relative to the file
    assert config.tags == {"project": "p"}


def test_load_config_finds_the_file_from_the_environment_then_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text('[cloud]\nname = "fromenv"\n')
    (tmp_path / "pygirder.toml").write_text('[cloud]\nname = "fromcwd"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert load_config().name == "fromcwd"
    monkeypatch.setenv(CONFIG_ENV, str(elsewhere))
    assert load_config().name == "fromenv"
    assert load_config(tmp_path / "pygirder.toml").name == "fromcwd"  # explicit wins


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "pygirder cloud init"),
        ("[grid]\nworkers = 1\n", "no [cloud] table"),
        ("[cloud\nname = 1", "not valid TOML"),
        ('cloud = "x"\n', "must be a table"),
    ],
)
def test_load_config_explains_a_missing_or_broken_file(
    tmp_path: Path, content: str | None, expected: str
) -> None:
    path = tmp_path / "pygirder.toml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CloudConfigError) as info:
        load_config(path)
    assert expected in str(info.value)


def test_the_config_is_immutable() -> None:
    config = config_from_dict({})
    with pytest.raises(ValueError, match="frozen"):
        config.name = "other"  # type: ignore[misc]


@given(st.ip_addresses(v=4), st.integers(min_value=1, max_value=32))
def test_any_ipv4_network_is_accepted_or_explained(address, prefix: int) -> None:
    value = f"{address}/{prefix}"
    try:
        config = config_from_dict({"ssh_from": value})
    except CloudConfigError as exc:
        assert "host bits" in str(exc) or (prefix < 16 and "wider than a /16" in str(exc))
        return
    assert prefix >= 16
    assert ipaddress.ip_network(config.ssh_from) == ipaddress.ip_network(value)


@given(st.text(max_size=30))
def test_any_name_is_accepted_or_explained(name: str) -> None:
    try:
        config = config_from_dict({"name": name})
    except CloudConfigError as exc:
        assert exc.problems and exc.problems[0][0] == "name"
        return
    assert isinstance(config, CloudConfig)
    assert config.resource_name("x").startswith(f"pygirder-{name}-")
