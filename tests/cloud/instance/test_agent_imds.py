"""The IMDSv2 emulator keeps the token rules of EC2, and the agent's client reads it."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from pygirder.cloud.errors import AgentError
from pygirder.cloud.instance.metadata import ImdsClient
from pygirder.cloud.sim.imds import ImdsEmulator


def _call(
    url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def _token(emulator: ImdsEmulator, ttl: int = 60) -> str:
    status, body = _call(
        emulator.url + "/latest/api/token",
        "PUT",
        {"X-aws-ec2-metadata-token-ttl-seconds": str(ttl)},
    )
    assert status == 200
    return body.decode()


def test_every_get_needs_a_live_token(imds: ImdsEmulator) -> None:
    url = imds.url + "/latest/meta-data/instance-id"
    assert _call(url)[0] == 401
    assert _call(url, headers={"X-aws-ec2-metadata-token": "forged"})[0] == 401
    token = _token(imds)
    assert _call(url, headers={"X-aws-ec2-metadata-token": token}) == (200, b"i-0feedfacecafe0001")
    imds.revoke_tokens()
    assert _call(url, headers={"X-aws-ec2-metadata-token": token})[0] == 401


def test_token_requests_follow_the_imdsv2_rules(imds: ImdsEmulator) -> None:
    url = imds.url + "/latest/api/token"
    assert _call(url, "PUT")[0] == 400  # no TTL header
    for bad in ("0", "21601", "soon"):
        assert _call(url, "PUT", {"X-aws-ec2-metadata-token-ttl-seconds": bad})[0] == 400
    forwarded = {"X-aws-ec2-metadata-token-ttl-seconds": "60", "X-Forwarded-For": "10.0.0.1"}
    assert _call(url, "PUT", forwarded)[0] == 403
    assert _call(imds.url + "/latest/api/token")[0] == 401  # GET is not how to get one


def test_tokens_expire(imds: ImdsEmulator) -> None:
    token = _token(imds, ttl=1)
    url = imds.url + "/latest/meta-data/ami-id"
    assert _call(url, headers={"X-aws-ec2-metadata-token": token})[0] == 200
    time.sleep(1.1)
    assert _call(url, headers={"X-aws-ec2-metadata-token": token})[0] == 401


def test_paths_and_listing() -> None:
    with ImdsEmulator(user_data=b"#!/bin/bash\necho hi\n", lifecycle="on-demand") as emulator:
        headers = {"X-aws-ec2-metadata-token": _token(emulator)}
        base = emulator.url + "/latest/"
        assert _call(base + "user-data", headers=headers) == (200, b"#!/bin/bash\necho hi\n")
        assert _call(base + "meta-data/public-hostname", headers=headers)[0] == 404
        assert _call(base + "meta-data/instance-life-cycle", headers=headers)[1] == b"on-demand"
        assert _call(base + "meta-data/placement/region", headers=headers)[1] == b"us-east-1"
        assert _call(base + "meta-data/nothing-here", headers=headers)[0] == 404
        listing = _call(base + "meta-data/", headers=headers)[1].decode().split("\n")
        assert "instance-id" in listing
        assert "placement/" in listing
        assert "spot/" not in listing
    with ImdsEmulator() as emulator:  # no user-data at all: 404 like EC2
        headers = {"X-aws-ec2-metadata-token": _token(emulator)}
        assert _call(emulator.url + "/latest/user-data", headers=headers)[0] == 404


def test_spot_notice_appears_when_raised(imds: ImdsEmulator) -> None:
    headers = {"X-aws-ec2-metadata-token": _token(imds)}
    url = imds.url + "/latest/meta-data/spot/instance-action"
    assert _call(url, headers=headers)[0] == 404
    when = imds.raise_spot_interruption("terminate", in_seconds=120)
    status, body = _call(url, headers=headers)
    assert status == 200
    assert json.loads(body) == {"action": "terminate", "time": when}
    assert _call(imds.url + "/latest/meta-data/spot/termination-time", headers=headers)[1] == (
        when.encode()
    )


def test_a_rebalance_recommendation_appears_when_raised_and_stays(imds: ImdsEmulator) -> None:
    headers = {"X-aws-ec2-metadata-token": _token(imds)}
    url = imds.url + "/latest/meta-data/events/recommendations/rebalance"
    client = ImdsClient()
    assert _call(url, headers=headers)[0] == 404 and client.rebalance_recommendation() is None
    when = imds.recommend_rebalance()
    status, body = _call(url, headers=headers)
    assert status == 200 and json.loads(body) == {"noticeTime": when}
    assert client.rebalance_recommendation() == when
    assert imds.recommend_rebalance() == when  # EC2 keeps the first one
    assert client.spot_action() is None  # a recommendation is no interruption notice


def test_client_reads_metadata_and_renews_tokens(imds: ImdsEmulator) -> None:
    client = ImdsClient()  # through PYGIRDER_IMDS_ENDPOINT
    assert client.endpoint == imds.url
    meta = client.metadata()
    assert meta.instance_id == "i-0feedfacecafe0001"
    assert meta.private_ip == "127.0.0.1"
    assert meta.public_hostname == "ec2-203-0-113-7.compute-1.amazonaws.com"
    assert (meta.zone, meta.region) == ("us-east-1b", "us-east-1")
    assert (meta.instance_type, meta.lifecycle) == ("c7a.large", "spot")
    assert client.get("meta-data/tags/instance/pygirder:role") == "worker"
    imds.revoke_tokens()  # the client's token is now stale: it must fetch a new one
    assert client.spot_action() is None
    imds.raise_spot_interruption("stop", in_seconds=30)
    assert client.spot_action()["action"] == "stop"


def test_client_error_names_the_endpoint() -> None:
    client = ImdsClient("http://127.0.0.1:9", timeout=0.5, attempts=2)
    with pytest.raises(AgentError, match=r"127\.0\.0\.1:9.*PYGIRDER_IMDS_ENDPOINT"):
        client.metadata()


def test_boto3_finds_the_emulator_through_its_env(
    imds: ImdsEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    import botocore.session
    from botocore.utils import InstanceMetadataRegionFetcher

    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED")
    session = botocore.session.get_session()
    endpoint = session.get_config_variable("ec2_metadata_service_endpoint")
    assert endpoint == imds.url + "/"
    fetcher = InstanceMetadataRegionFetcher(
        timeout=2, num_attempts=1, config={"ec2_metadata_service_endpoint": endpoint}
    )
    assert fetcher.retrieve_region() == "us-east-1"
