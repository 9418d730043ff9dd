"""A large result reaches the server as a plain SET of its own, not copied through the
arguments of the completion script; small ones still ride inside it."""

from __future__ import annotations

import threading

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


def test_large_results_are_stored_outside_the_script(grid_factory, valkey_server):
    grid = grid_factory(workers=1)
    big, small = gf.big_bytes(300_000), gf.big_bytes(1000)
    events: list[dict] = []
    ready = threading.Event()
    watcher = threading.Thread(target=_monitor, args=(valkey_server.url, events, ready))
    watcher.start()
    ready.wait(10)
    try:
        assert grid.run(big) == b"x" * 300_000
        assert grid.run(small) == b"x" * 1000
    finally:
        redis.Redis.from_url(valkey_server.url).echo(END)
        watcher.join(30)
    keys = Keys(grid.namespace)
    words = [(e["command"].split(" ", 2), e["client_type"]) for e in events]
    sets = {w[1]: kind for w, kind in words if w[0].upper() == "SET" and len(w) > 1}
    assert sets[keys.result(big.id)] != "lua"  # the worker's own SET
    assert sets[keys.result(small.id)] == "lua"  # inside the completion script
    scripts = [e["command"] for e in events if e["command"].upper().startswith("EVALSHA")]
    assert scripts and max(len(c) for c in scripts) < 100_000
