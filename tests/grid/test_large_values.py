"""A large result reaches the server as a plain SET of its own, not copied through the
arguments of the completion script; small ones still ride inside it."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import pytest
import redis

import gridfuncs as gf
from pygirder.store.keys import Keys

END = "end-of-the-test"


def _monitor(url: str, events: list[dict], ready: threading.Event) -> None:
    """Every command the server runs, until someone sends ``ECHO end-of-the-test``."""
    client = redis.Redis.from_url(url)
    with client.monitor() as mon:
        ready.set()
        for event in mon.listen():
            if END in event["command"]:
                break
            events.append(event)
    client.close()


@contextlib.contextmanager
def _watching(url: str) -> Iterator[list[dict]]:
    """The commands the server runs inside the block (MONITOR in a thread)."""
    events: list[dict] = []
    ready = threading.Event()
    watcher = threading.Thread(target=_monitor, args=(url, events, ready))
    watcher.start()
    ready.wait(10)
    try:
        yield events
    finally:
        redis.Redis.from_url(url).echo(END)
        watcher.join(30)


def test_large_results_are_stored_outside_the_script(grid_factory, valkey_server):
    grid = grid_factory(workers=1)
    big, small = gf.big_bytes(300_000), gf.big_bytes(1000)
    with _watching(valkey_server.url) as events:
        assert grid.run(big) == b"x" * 300_000
        assert grid.run(small) == b"x" * 1000
    keys = Keys(grid.namespace)
    words = [(e["command"].split(" ", 2), e["client_type"]) for e in events]
    sets = {w[1]: kind for w, kind in words if w[0].upper() == "SET" and len(w) > 1}
    assert sets[keys.result(big.id)] != "lua"  # the worker's own SET
    assert sets[keys.result(small.id)] == "lua"  # inside the completion script
    scripts = [e["command"] for e in events if e["command"].upper().startswith("EVALSHA")]
    assert scripts and max(len(c) for c in scripts) < 100_000


def _calls(url: str, command: str) -> int:
    stats = redis.Redis.from_url(url).info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def test_large_results_are_read_with_pipelined_gets_not_mget(grid_factory, valkey_server):
    grid = grid_factory(workers=1)
    mgets, gets = _calls(valkey_server.url, "mget"), _calls(valkey_server.url, "get")
    assert grid.wait([gf.big_bytes(200_000 + i) for i in range(3)]) == [
        b"x" * (200_000 + i) for i in range(3)
    ]
    assert _calls(valkey_server.url, "mget") == mgets
    assert _calls(valkey_server.url, "get") >= gets + 3


def test_summaries_of_large_values_never_render_them_whole(monkeypatch):
    """The call graph's one-line summary of a 10 MB bytes value (or a dataclass holding
    one) once rendered all 40 MB of its repr before cutting it to 200 characters."""
    import builtins
    import dataclasses

    from pygirder.grid.protocol import summarize

    @dataclasses.dataclass
    class Holder:
        data: bytes
        n: int

    rendered: list[int] = []
    real_repr = builtins.repr

    def spy(obj):
        text = real_repr(obj)
        rendered.append(len(text))
        return text

    monkeypatch.setattr(builtins, "repr", spy)
    big = b"\x00" * 1_000_000
    assert summarize(big).startswith("b'\\x00")
    assert summarize(Holder(big, 3)).startswith("Holder(data=b'\\x00")
    assert summarize({"k": [big, bytearray(big)]}).startswith("{'k': [b'")
    monkeypatch.undo()
    assert max(rendered) < 1000


def test_a_large_array_decodes_with_one_copy():
    """The general path held three copies of a large array's data at once (the
    extension's payload, the bin object in it, the array); one is the array itself."""
    import tracemalloc

    import numpy as np

    from pygirder import codec

    array = np.arange(2_000_000, dtype="<f8").reshape(1000, 2000)
    data = codec.encode(array)
    tracemalloc.start()
    try:
        value = codec.decode(memoryview(data))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert value.dtype == array.dtype and value.shape == array.shape
    assert (value == array).all() and value.flags.writeable and value.flags.owndata
    assert peak < 1.3 * array.nbytes


def test_a_large_array_message_that_lies_fails_like_any_other():
    import numpy as np

    from pygirder import codec
    from pygirder.errors import CodecError

    data = bytearray(codec.encode(np.zeros(100_000, dtype="<f8")))
    assert data[0] == 0xC9
    shorter = bytes(data[:-8])  # every length now disagrees with the bytes there
    with pytest.raises(CodecError):
        codec.decode(shorter)
    at = data.index(b"<f8")
    wrong_dtype = bytes(data[:at] + b"<i4" + data[at + 3 :])  # data no longer fits
    with pytest.raises(CodecError, match="does not match its dtype"):
        codec.decode(wrong_dtype)
    objects = bytes(data[:at] + b"|O8" + data[at + 3 :])
    with pytest.raises(CodecError, match="dtype"):
        codec.decode(objects)


def test_large_arguments_are_stored_outside_the_scripts(grid_factory, valkey_server):
    import zlib

    grid = grid_factory(workers=1)
    data = bytes(range(256)) * 1200  # 300 KB
    call = gf.digest(data)
    with _watching(valkey_server.url) as events:
        assert grid.run(call) == [len(data), zlib.crc32(data)]
        # inside a worker: the nested call's payload goes the same way
        assert grid.run(gf.digest_inside(data[1:])) == [len(data) - 1, zlib.crc32(data[1:])]
    keys = Keys(grid.namespace)
    scripts = [e["command"] for e in events if e["command"].upper().startswith("EVALSHA")]
    assert scripts and max(len(c) for c in scripts) < 100_000  # neither submit nor take
    sets = [e for e in events if e["command"].upper().startswith("SET ")]
    assert any(keys.argument(call.id) in e["command"] for e in sets)
    client = redis.Redis.from_url(valkey_server.url)
    for _ in range(100):  # deleted by the worker once the result is stored
        if not client.exists(keys.argument(call.id)):
            break
        time.sleep(0.05)
    assert not client.exists(keys.argument(call.id))


def test_a_stored_payload_that_is_gone_is_a_clear_error(redis_url):
    import asyncio

    from pygirder.errors import CodecError
    from pygirder.grid.runtime import Runtime

    async def main():
        runtime = Runtime(redis_url, namespace="gone")
        await runtime.connect()
        try:
            with pytest.raises(CodecError, match=r"no longer on the server.*submit the call"):
                await runtime.read_payload("0" * 40)
        finally:
            await runtime.redis.aclose()

    asyncio.run(main())
