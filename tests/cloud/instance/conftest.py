"""Fixtures for the on-instance agent tests: an IMDSv2 emulator and the status topic's queue."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from pygirder.cloud.instance.announce import Announcement
from pygirder.cloud.sim.imds import ImdsEmulator


@pytest.fixture(autouse=True)
def _never_the_real_imds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the agent at a closed loopback port unless a test gives it an emulator.

    A test that forgets its emulator then fails fast with "connection refused" instead
    of reaching for 169.254.169.254.
    """
    monkeypatch.setenv("PYGIRDER_IMDS_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def imds(monkeypatch: pytest.MonkeyPatch) -> Iterator[ImdsEmulator]:
    """A running emulator for a spot worker with a public name; env points the agent at it."""
    with ImdsEmulator(
        instance_id="i-0feedfacecafe0001",
        local_ipv4="127.0.0.1",
        public_hostname="ec2-203-0-113-7.compute-1.amazonaws.com",
        availability_zone="us-east-1b",
        instance_type="c7a.large",
        lifecycle="spot",
        ami_id="ami-0pygirder000001",
        tags={"pygirder:role": "worker"},
    ) as emulator:
        for key, value in emulator.env().items():
            monkeypatch.setenv(key, value)
        yield emulator


@dataclass
class StatusQueue:
    """The fleet's SNS status topic with an SQS queue subscribed, as account setup makes it."""

    topic_arn: str
    queue_url: str
    sqs: Any

    def receive(self, count: int, timeout: float = 15.0) -> list[Announcement]:
        """Wait for ``count`` announcements (or raise, listing what did arrive)."""
        found: list[Announcement] = []
        deadline = time.monotonic() + timeout
        while len(found) < count and time.monotonic() < deadline:
            response = self.sqs.receive_message(
                QueueUrl=self.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1
            )
            for message in response.get("Messages", []):
                found.append(Announcement.from_message(message["Body"]))
                self.sqs.delete_message(
                    QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"]
                )
        if len(found) < count:
            events = [a.event for a in found]
            raise AssertionError(f"expected {count} announcements in {timeout}s, got {events}")
        return found

    def wait_for(self, event: str, timeout: float = 15.0) -> tuple[Announcement, list]:
        """Receive until an announcement of ``event`` arrives; returns it and all seen."""
        seen: list[Announcement] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                batch = self.receive(1, timeout=max(0.5, deadline - time.monotonic()))
            except AssertionError:
                break
            seen.extend(batch)
            for announcement in batch:
                if announcement.event == event:
                    return announcement, seen
        events = [a.event for a in seen]
        raise AssertionError(f"no {event!r} announcement in {timeout}s; saw {events}")


@pytest.fixture
def status(aws: Any) -> StatusQueue:
    import boto3

    sns = boto3.client("sns")
    sqs = boto3.client("sqs")
    topic_arn = sns.create_topic(Name="pygirder-status")["TopicArn"]
    queue_url = sqs.create_queue(QueueName="pygirder-status")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "sns.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": queue_arn,
                "Condition": {"ArnEquals": {"aws:SourceArn": topic_arn}},
            }
        ],
    }
    sqs.set_queue_attributes(QueueUrl=queue_url, Attributes={"Policy": json.dumps(policy)})
    # Raw delivery, as the account setup subscribes it: a body is what the instance sent.
    sns.subscribe(
        TopicArn=topic_arn,
        Protocol="sqs",
        Endpoint=queue_arn,
        Attributes={"RawMessageDelivery": "true"},
    )
    return StatusQueue(topic_arn=topic_arn, queue_url=queue_url, sqs=sqs)
