"""The agent announces its instance on the SNS status topic; the message reaches SQS whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from botocore.exceptions import ClientError

from pygirder.cloud.errors import AgentError
from pygirder.cloud.instance import agent, announce, common
from pygirder.cloud.instance.announce import Announcement
from pygirder.cloud.instance.common import Event, mask_url


def _agent_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pygirder.cloud.instance.agent", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
        check=False,
    )


def test_announce_reaches_the_queue_with_every_field(imds, status) -> None:
    before = datetime.now(UTC)
    proc = _agent_cli(
        "announce", "--topic-arn", status.topic_arn, "--launch-id", "L-42",
        "--role", "worker", "--event", "up", "--fleet", "f-7", "--detail", "booted",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    [message] = status.receive(1)
    assert message.event == "up"
    assert message.launch_id == "L-42"
    assert message.fleet == "f-7"
    assert message.role == "worker"
    assert message.instance_id == "i-0feedfacecafe0001"
    assert message.private_ip == "127.0.0.1"
    assert message.public_hostname == "ec2-203-0-113-7.compute-1.amazonaws.com"
    assert message.zone == "us-east-1b"
    assert message.instance_type == "c7a.large"
    assert message.lifecycle == "spot"
    assert message.ami_id == "ami-0pygirder000001"
    assert message.pygirder_version == common.pygirder_version() != "unknown"
    assert message.detail == "booted"
    sent = datetime.fromisoformat(message.time.replace("Z", "+00:00"))
    assert before <= sent <= datetime.now(UTC)


def test_announce_carries_the_ssh_host_keys(imds, status, tmp_path, monkeypatch) -> None:
    ed25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDrZ2/fj2i2RDlxzFQE/0li3aGxvKT7OXirOAyehzMF4"
    (tmp_path / "ssh_host_ed25519_key.pub").write_text(ed25519 + " root@ip-10-42-0-5\n")
    (tmp_path / "ssh_host_rsa_key.pub").write_text("ssh-rsa not*base64 root@host\n")
    (tmp_path / "ssh_host_ed25519_key").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    monkeypatch.setenv(announce.HOST_KEY_DIR_ENV, str(tmp_path))
    proc = _agent_cli(
        "announce", "--topic-arn", status.topic_arn, "--launch-id", "L-42",
        "--role", "redis", "--event", "ready", "--fleet", "f-7",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    [message] = status.receive(1)
    # The public key only (never the private file, never a malformed line or comment).
    assert message.host_keys == (ed25519,)
    monkeypatch.setenv(announce.HOST_KEY_DIR_ENV, str(tmp_path / "missing"))
    assert announce.read_host_keys() == ()


def test_announce_without_public_name(status, monkeypatch) -> None:
    from pygirder.cloud.sim.imds import ImdsEmulator

    with ImdsEmulator(lifecycle="on-demand", local_ipv4="10.0.1.9") as emulator:
        monkeypatch.setenv("PYGIRDER_IMDS_ENDPOINT", emulator.url)
        meta = agent.ImdsClient().metadata()
        agent.publish_announcement(
            status.topic_arn,
            Announcement.make(Event.READY, launch_id="L-1", role="redis", meta=meta),
        )
    [message] = status.receive(1)
    assert (message.event, message.public_hostname, message.lifecycle) == (
        "ready",
        None,
        "on-demand",
    )
    assert message.private_ip == "10.0.1.9"


def test_announce_fails_clearly_on_a_missing_topic(imds, status) -> None:
    missing = status.topic_arn + "-gone"
    proc = _agent_cli(
        "announce", "--topic-arn", missing, "--launch-id", "L", "--role", "worker",
        "--event", "up",
    )  # fmt: skip
    assert proc.returncode == 1
    assert "announcing up on " + missing in proc.stderr


def test_announce_rejects_an_unknown_event(imds) -> None:
    proc = _agent_cli(
        "announce", "--topic-arn", "arn:aws:sns:us-east-1:123456789012:t", "--launch-id", "L",
        "--role", "worker", "--event", "exploded",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "exploded" in proc.stderr


def test_message_parses_from_raw_and_sns_envelope() -> None:
    meta = agent.InstanceMetadata("i-1", "10.0.0.1", None, "eu-west-1a", "eu-west-1", "m7g.large",
                                  "spot", "ami-1")  # fmt: skip
    message = Announcement.make("going-away", launch_id="L", role="worker", meta=meta)
    envelope = json.dumps({"Type": "Notification", "Message": message.to_json()})
    assert Announcement.from_message(envelope) == message
    assert Announcement.from_message(message.to_json()) == message
    with pytest.raises(ValueError, match="not a pygirder"):
        Announcement.from_message(json.dumps({"Type": "Notification", "Message": "{}"}))


def _client_error(code: str, status_code: int = 400) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code},
         "ResponseMetadata": {"HTTPStatusCode": status_code}},
        "Publish",
    )  # fmt: skip


def test_only_transient_errors_are_retried_and_retries_are_bounded(monkeypatch) -> None:
    monkeypatch.setattr(agent.time, "sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise _client_error("Throttling")
        return "ok"

    assert announce._with_retries("publishing", flaky) == "ok"
    assert len(calls) == 3

    calls.clear()

    def denied():
        calls.append(1)
        raise _client_error("AuthorizationError", 403)

    with pytest.raises(AgentError, match="publishing failed"):
        announce._with_retries("publishing", denied)
    assert len(calls) == 1

    calls.clear()

    def down():
        calls.append(1)
        raise _client_error("InternalError", 500)

    with pytest.raises(AgentError):
        announce._with_retries("publishing", down, attempts=4)
    assert len(calls) == 4


def test_region_comes_from_the_topic_arn() -> None:
    assert agent.region_of_arn("arn:aws:sns:eu-north-1:123456789012:status") == "eu-north-1"
    with pytest.raises(agent.ConfigError, match="not an SNS topic ARN"):
        agent.region_of_arn("pygirder-status")


def test_passwords_are_masked_in_urls() -> None:
    assert mask_url("connect redis://:s3cr%2Ft@10.0.0.5:6379/0 now") == (
        "connect redis://:***@10.0.0.5:6379/0 now"
    )
    assert mask_url("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    assert mask_url("redis://10.0.0.5:6379/0") == "redis://10.0.0.5:6379/0"
