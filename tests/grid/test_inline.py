"""Short sync calls run on the worker's event loop thread; every way out of that is guarded.

A function runs inline (on the worker's ``MainThread``) once its runs were short; one
that turns slow, waits on the grid or raises a BaseException while inline ends as it
would on a thread, and the worker goes on serving.
"""

from __future__ import annotations

import time

import pytest
import redis

import gridfuncs as gf
import hostilefuncs as hf
import pygirder
from pygirder.observe.logs import read_logs

LOOP = "MainThread"  # the worker process's event loop runs in its main thread


@pytest.fixture(autouse=True)
def short_is_generous(monkeypatch):
    # a run under 0.25 s is short, so a stalled machine cannot make the fast runs look
    # slow; an inline run is aborted after 0.5 s
    monkeypatch.setenv("PYGIRDER_INLINE_S", "0.25")
    monkeypatch.setenv("PYGIRDER_HEARTBEAT_TTL", "2.0")


def test_the_first_run_is_on_a_thread_and_short_ones_then_run_inline(grid_factory):
    grid = grid_factory(workers=1)
    first = grid.run(hf.spins_for(0, 0.0), timeout=30)
    assert first.startswith("pygirder-call")
    assert [grid.run(hf.spins_for(i, 0.0), timeout=30) for i in range(1, 4)] == [LOOP] * 3


def test_inline_off_keeps_every_run_on_a_thread(grid_factory, monkeypatch):
    monkeypatch.setenv("PYGIRDER_INLINE_S", "0")
    grid = grid_factory(workers=1)
    where = [grid.run(hf.spins_for(i, 0.0), timeout=30) for i in range(3)]
    assert all(w.startswith("pygirder-call") for w in where), where


def test_a_formerly_fast_function_that_spins_is_aborted_and_rerun_on_a_thread(grid_factory):
    grid = grid_factory(workers=1)
    for i in range(3):
        grid.run(hf.spins_for(i, 0.0), timeout=30)
    assert grid.run(hf.spins_for(3, 0.0), timeout=30) == LOOP
    # inline, this one would stop the loop for 3 s: aborted after 0.5 s, it runs again
    # (and ends) on a thread, while the worker's heartbeat goes on
    assert grid.run(hf.spins_for(4, 3.0), timeout=30).startswith("pygirder-call")
    # back on threads until twice as many short runs in a row as before
    after = [grid.run(hf.spins_for(i, 0.0), timeout=30) for i in range(5, 10)]
    assert after[0].startswith("pygirder-call") and after[1].startswith("pygirder-call")
    assert LOOP in after, after
    assert grid._supervisor.restarts == 0


def test_a_run_blocked_in_c_inline_keeps_the_heartbeat_and_runs_once(
    grid_factory, monkeypatch, tmp_path
):
    # the loop is held three heartbeat TTLs by a sleep no Reroute can interrupt: the
    # peer must not count its worker dead and run the call a second time
    ttl = 1.5
    monkeypatch.setenv("PYGIRDER_HEARTBEAT_TTL", str(ttl))
    log = str(tmp_path / "runs")
    grid = grid_factory(workers=2)
    inline: set[int] = set()  # the workers where it ran inline: both, before the long run
    for i in range(40):
        where, pid = grid.run(hf.sleeps_for(i, 0.0, log), timeout=30)
        if where == LOOP:
            inline.add(pid)
        if len(inline) == 2:
            break
    assert len(inline) == 2, "both workers should run the fast function inline"
    where, blocked = grid.run(hf.sleeps_for(100, 3 * ttl, log), timeout=60)
    assert gf.count(log)["100"] == 1
    assert grid.stats().get("dead_workers", 0) == 0
    assert where == LOOP  # it finished inline and its result was kept
    # that worker sends the function back to threads; both workers still serve
    later = [grid.run(hf.sleeps_for(i, 0.0, log), timeout=30) for i in range(200, 210)]
    after_block = [w for w, pid in later if pid == blocked]
    assert after_block and after_block[0] != LOOP, later
    assert len({pid for _, pid in later}) == 2, later
    assert grid.run(hf.inc(1), timeout=30) == 2
    assert grid.stats().get("dead_workers", 0) == 0
    assert grid._supervisor.restarts == 0
    client = redis.Redis.from_url(grid.url)
    try:  # the worker said so, once, naming the function
        deadline = time.monotonic() + 10  # records reach the stream in batches
        while time.monotonic() < deadline:
            warned = [e.message for e in read_logs(client, grid.namespace, level="WARNING")
                      if "blocked the worker's loop in C" in e.message]  # fmt: skip
            if warned:
                break
            time.sleep(0.1)
    finally:
        client.close()
    assert len(warned) == 1 and "sleeps_for" in warned[0] and "threads" in warned[0], warned


def test_a_run_blocked_in_c_inline_is_still_held_to_its_max_runtime(grid_factory):
    grid = grid_factory(workers=1)
    assert grid.run(hf.sleeps_limited(0, 0.0), timeout=30).startswith("pygirder-call")
    assert grid.run(hf.sleeps_limited(1, 0.0), timeout=30) == LOOP
    with pytest.raises(pygirder.RemoteError) as info:  # inline, sleeping far past 2 s
        grid.run(hf.sleeps_limited(2, 60.0), timeout=40)
    assert info.value.remote_type == "pygirder.MaxRuntimeExceeded"
    assert grid.run(hf.inc(1), timeout=30) == 2  # the worker came back


def test_a_call_that_waits_while_inline_reruns_on_a_thread_and_counts_once(grid_factory):
    # it waits through a helper, which its own code does not show
    grid = grid_factory(workers=1)
    assert grid.run(hf.waits_if(1, False), timeout=30)[1].startswith("pygirder-call")
    assert grid.run(hf.waits_if(2, False), timeout=30) == (2, LOOP)
    before = grid.stats()
    # inline it cannot wait (the loop it would wait on is its own): rerun on a thread,
    # even though it swallows the exception that stopped it
    value, where = grid.run(hf.waits_if(3, True), timeout=30)
    assert value == 4 and where.startswith("pygirder-call")
    after = grid.stats()
    assert after["executed"] - before["executed"] == 2  # itself and inc(3), once each
    # a function that waits never runs inline again
    assert grid.run(hf.waits_if(5, False), timeout=30)[1].startswith("pygirder-call")
    assert grid.run(hf.waits_if(6, False), timeout=30)[1].startswith("pygirder-call")


def test_a_function_whose_code_waits_never_runs_inline(grid_factory):
    # a rerun would repeat what it did before its wait, such as writing a log
    grid = grid_factory(workers=1)
    where = [grid.run(hf.names_a_wait(i, False), timeout=30) for i in range(3)]
    assert all(w.startswith("pygirder-call") for w in where), where


@pytest.mark.parametrize("kind", ["SystemExit", "Custom"])
def test_a_base_exception_raised_inline_is_an_error_and_the_worker_lives(grid_factory, kind):
    grid = grid_factory(workers=1)
    grid.run(hf.exits_if(0, ""), timeout=30)
    assert grid.run(hf.exits_if(1, ""), timeout=30) == LOOP
    with pytest.raises(pygirder.RemoteError) as info:
        grid.run(hf.exits_if(2, kind), timeout=30)
    assert info.value.remote_type.endswith(kind)
    assert f"on {LOOP}" in info.value.message  # it was raised inline
    assert grid.run(hf.exits_if(3, ""), timeout=30) == LOOP  # short runs stay inline
    assert grid.run(hf.inc(7), timeout=30) == 8
    assert grid._supervisor.restarts == 0


def test_a_blocking_wait_in_an_async_function_is_an_error_not_a_deadlock(grid_factory):
    grid = grid_factory(workers=1)
    with pytest.raises(pygirder.RemoteError) as info:
        grid.run(hf.blocks_loop(1), timeout=30)
    assert "await" in info.value.message
    assert grid.run(hf.inc(1), timeout=30) == 2
