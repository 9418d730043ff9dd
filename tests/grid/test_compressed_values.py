"""Large values compressed on their way to the server: only where it pays, only when
configured (or on a network), and bounded for any bytes a reader is handed."""

from __future__ import annotations

import os

import lz4.block
import pytest
import redis

import gridfuncs as gf
from pygirder.errors import CodecError, ConfigError
from pygirder.grid.protocol import (
    COMPRESSED,
    ERR,
    compress,
    compressing,
    decode_envelope,
    encode_ok,
    expand,
)
from pygirder.store.keys import Keys


def _envelope(value: object) -> bytes:
    return encode_ok(value, name="f", limit=None)


def test_compressible_envelopes_shrink_and_come_back_equal():
    value = b"abcd" * 100_000
    envelope = _envelope(value)
    packed = compress(envelope)
    assert packed[:1] == COMPRESSED and len(packed) < len(envelope) // 10
    assert expand(packed) == envelope
    assert decode_envelope(packed) == value


def test_what_does_not_pay_travels_as_it_is():
    noise = _envelope(os.urandom(200_000))
    assert compress(noise) is noise  # incompressible
    small = _envelope(b"a" * 1000)
    assert compress(small) is small  # below the threshold
    error = ERR + b"a" * 200_000
    assert compress(error) is error  # errors stay readable by the completion script
    assert expand(small) is small


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (COMPRESSED + b"\x00\x01", "truncated"),
        # a bomb: a few bytes that declare a gigabyte
        (COMPRESSED + (1 << 30).to_bytes(4, "little") + b"\x1f\x00", "over the limit"),
        # within the limit, but more than lz4 can make of 10 bytes
        (COMPRESSED + (1 << 20).to_bytes(4, "little") + b"\x00" * 10, "cannot expand"),
        (COMPRESSED + (1000).to_bytes(4, "little") + os.urandom(200), "corrupt"),
        # expands to fewer bytes than it declares
        (
            COMPRESSED
            + (2000).to_bytes(4, "little")
            + lz4.block.compress(b"O" + b"a" * 999, store_size=False),
            "corrupt",
        ),
        # a compressed value inside a compressed value
        (
            COMPRESSED
            + (1000).to_bytes(4, "little")
            + lz4.block.compress(COMPRESSED + b"a" * 999, store_size=False),
            "corrupt",
        ),
    ],
    ids=["truncated", "bomb", "impossible-ratio", "garbage", "short", "nested"],
)
def test_hostile_compressed_values_fail_clearly(data, match, monkeypatch):
    monkeypatch.setenv("PYGIRDER_MAX_RESULT_BYTES", str(64 << 20))
    with pytest.raises(CodecError, match=match):
        decode_envelope(data)


def test_the_limit_is_the_largest_result(monkeypatch):
    envelope = _envelope(b"z" * 300_000)
    packed = compress(envelope)
    monkeypatch.setenv("PYGIRDER_MAX_RESULT_BYTES", "100000")
    with pytest.raises(CodecError, match="PYGIRDER_MAX_RESULT_BYTES"):
        decode_envelope(packed)


def test_compression_is_on_for_a_network_and_off_on_loopback(monkeypatch):
    monkeypatch.delenv("PYGIRDER_COMPRESS", raising=False)
    assert not compressing("redis://127.0.0.1:6379/0")
    assert not compressing("redis://:pw@localhost:1/0")
    assert not compressing("unix:///tmp/valkey.sock")
    assert compressing("redis://10.0.3.7:6379/0")
    assert compressing("rediss://cache.example.internal:6380")
    monkeypatch.setenv("PYGIRDER_COMPRESS", "lz4")
    assert compressing("redis://127.0.0.1:6379/0")
    monkeypatch.setenv("PYGIRDER_COMPRESS", "off")
    assert not compressing("redis://10.0.3.7:6379/0")
    monkeypatch.setenv("PYGIRDER_COMPRESS", "zip")
    with pytest.raises(ConfigError, match=r"PYGIRDER_COMPRESS='zip'.*auto, lz4, off"):
        compressing("redis://10.0.3.7:6379/0")


def test_workers_store_large_results_compressed_when_configured(
    grid_factory, valkey_server, monkeypatch
):
    monkeypatch.setenv("PYGIRDER_COMPRESS", "lz4")
    grid = grid_factory(workers=1)
    call = gf.big_bytes(500_000)
    assert grid.run(call) == b"x" * 500_000
    stored = redis.Redis.from_url(valkey_server.url).get(Keys(grid.namespace).result(call.id))
    assert stored[:1] == COMPRESSED and len(stored) < 50_000
    grid.runtime.forget_cached()
    assert grid.run(call) == b"x" * 500_000  # read back from the server, expanded


def test_a_bad_setting_fails_when_the_grid_opens(grid_factory, monkeypatch):
    monkeypatch.setenv("PYGIRDER_COMPRESS", "gzip")
    with pytest.raises(ConfigError, match="PYGIRDER_COMPRESS='gzip'"):
        grid_factory(workers=0)
