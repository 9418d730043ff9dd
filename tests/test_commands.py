"""The `pygirder` command: one-off calls, garbage collection, the demo, service options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import redis

import gridfuncs as gf
from pygirder.errors import ConfigError
from pygirder.grid.maintenance import parse_age
from pygirder.status import call_info
from pygirder.store.keys import Keys

TESTS = os.path.dirname(__file__)


def pygirder_cmd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=TESTS, COLUMNS="160")
    return subprocess.run(
        [sys.executable, "-m", "pygirder", *args],
        capture_output=True, text=True, timeout=timeout, cwd=TESTS, env=env,
    )  # fmt: skip


def test_submit_runs_one_call_from_the_shell(grid_factory):
    grid = grid_factory(workers=1)
    out = pygirder_cmd("submit", "gridfuncs:add", "--args", "[2, 3]", "--redis", grid.url,
                       "--namespace", grid.namespace, "--workers", "0")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "5"
    bad = pygirder_cmd("submit", "gridfuncs:record", "--redis", grid.url, "--workers", "0")
    assert bad.returncode == 2 and "is not a grid function" in bad.stderr
    bad = pygirder_cmd("submit", "gridfuncs:add", "--args", "{nope", "--redis", grid.url)
    assert bad.returncode == 2 and "not valid JSON" in bad.stderr
    failed = pygirder_cmd("submit", "gridfuncs:fail_level1", "--args", "[1]", "--redis", grid.url,
                          "--namespace", grid.namespace, "--workers", "0")  # fmt: skip
    assert failed.returncode == 1 and "gridfuncs.Boom: bad input 1" in failed.stderr


def test_gc_drops_idle_results_and_keeps_recent_ones(grid_factory):
    grid = grid_factory(workers=1)
    assert grid.map(gf.add, [(i, 1) for i in range(20)]) == [i + 1 for i in range(20)]
    keys = Keys(grid.namespace)
    client = redis.Redis.from_url(grid.url)
    try:
        results = lambda: len(list(client.scan_iter(match=keys.prefix + "res:*")))  # noqa: E731
        assert results() == 20
        assert grid.gc(3600).total == 0  # everything is recent
        time.sleep(2.1)
        client.get(keys.result(gf.add(0, 1).id))  # a read keeps a result alive
        dry = grid.gc(1, dry_run=True)
        assert dry.dropped["results"] == 19 and results() == 20
        # The command starts a new interpreter, which can take longer than the age on a
        # loaded machine; the one result read just now is then old too.  What the
        # command must get right is that it drops what it reports and nothing else.
        out = pygirder_cmd("gc", "--older-than", "1s", "--redis", grid.url,
                           "--namespace", grid.namespace)  # fmt: skip
        assert out.returncode == 0, out.stderr
        row = next(line for line in out.stdout.splitlines() if " results " in line)
        dropped = int(row.split("│")[2].strip().replace(",", ""))
        assert dropped in (19, 20) and results() == 20 - dropped
    finally:
        client.close()


def test_parse_age():
    assert parse_age("90") == 90 and parse_age("2h") == 7200 and parse_age("1.5m") == 90
    with pytest.raises(ConfigError, match="optional unit"):
        parse_age("two hours")


def test_service_options_on_grid_commands():
    out = pygirder_cmd("worker", "--json", "--opts", '{"no_such_option": 1}')
    assert out.returncode == 2
    envelope = json.loads(out.stdout)
    assert envelope["result"] is None and "no_such_option" in envelope["error"]["message"]
    out = pygirder_cmd(
        "worker", "--json", "--processes", "zero", "--redis", "redis://127.0.0.1:1/0"
    )
    assert out.returncode == 1
    assert "positive number or 'auto'" in json.loads(out.stdout)["error"]["message"]


@pytest.mark.slow
def test_demo_runs_and_checks_itself():
    out = pygirder_cmd("demo", "--depth", "3", "--fanout", "3", "--steps", "8", "--workers", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("ok") >= 3 and "FAILED" not in out.stdout
    assert "45 unique calls" in out.stdout  # (8+1)(8+2)/2


def test_logs_of_worker_processes_reach_the_grid_stream(grid_factory):
    from pygirder.logs import read_logs

    grid = grid_factory(workers=2)
    calls = [gf.noisy(i) for i in range(12)]
    assert grid.wait(calls, timeout=30) == list(range(12))
    client = redis.Redis.from_url(grid.url)
    try:
        deadline = time.monotonic() + 10
        while True:
            entries = [e for e in read_logs(client, grid.namespace, count=500)
                       if "hello from call" in e.message]  # fmt: skip
            if len(entries) >= 12 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        ran_by = {c.id: call_info(client, grid.namespace, c.id)["worker"] for c in calls}
    finally:
        client.close()
    assert len(entries) == 12
    assert {e.request for e in entries} == {c.id for c in calls}
    # each record names the worker process that ran its call (however the two workers
    # happened to share the calls out)
    assert {e.request: e.process for e in entries} == ran_by
    assert set(ran_by.values()) <= set(grid.workers())
    out = pygirder_cmd("logs", "--redis", grid.url, "--namespace", grid.namespace,
                       "--level", "WARNING", "-n", "50")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("hello from call") == 12
