"""A sync client on the session's Valkey, flushed for each test: the scripts' tests
drive the server-side scripts directly, as a worker or client would."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()
