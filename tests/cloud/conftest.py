"""Fixtures for the cloud tests: configs, and an Aws adaptor that records and can fail.

Everything talks to the session moto server of the ``aws`` fixture over real HTTP.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cloud_helpers import PUBLIC_KEY, SSH_FROM, Faults, Sleeps, fresh_session

from pygirder.cloud.config import CloudConfig, config_from_dict


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., CloudConfig]:
    """``make_config(**overrides)``: a valid config whose files live in tmp_path."""
    pub = tmp_path / "id_ed25519.pub"
    pub.write_text(PUBLIC_KEY + "\n")

    def make(**overrides: Any) -> CloudConfig:
        data: dict[str, Any] = {
            "name": "t",
            "ssh_from": SSH_FROM,
            "public_key_file": str(pub),
            "cluster_key_file": str(tmp_path / "keys" / "cluster.pem"),
            "alert_email": "ops@example.com",
        }
        data.update(overrides)
        return config_from_dict(data, base_dir=tmp_path)

    return make


@pytest.fixture
def config(make_config: Callable[..., CloudConfig]) -> CloudConfig:
    return make_config()


@pytest.fixture
def make_aws(aws: Any) -> Callable[..., tuple[Any, Faults, Sleeps]]:
    """``aws_, faults, sleeps = make_aws(config)``: an Aws on its own boto3 session,
    with fault injection and a recording (non-)sleep."""
    from pygirder.cloud.aws import Aws

    def make(config: CloudConfig, **kwargs: Any) -> tuple[Aws, Faults, Sleeps]:
        boto_session = fresh_session(config.region)
        faults = Faults(boto_session)
        sleeps = Sleeps()
        return Aws(config, boto_session=boto_session, sleep=sleeps, **kwargs), faults, sleeps

    return make


@pytest.fixture
def boto(aws: Any) -> Callable[..., Any]:
    """Independent boto3 clients (no pygirder code) for checking what really exists."""

    def client(service: str, region: str = "us-east-1") -> Any:
        return fresh_session(region).client(service)

    return client
