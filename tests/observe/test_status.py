"""`pygirder status` and `pygirder inspect` on a real Valkey with real worker processes."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

import gridfuncs as gf
import pygirder
from pygirder.cli.status import app
from pygirder.observe.status import CallLookupError, FailureScanner, call_info, collect_status


@pytest.fixture
def grid(grid_factory):
    return grid_factory(workers=2)


@pytest.fixture
def client(grid):
    c = redis.Redis.from_url(grid.url)
    yield c
    c.close()


def settled(client: redis.Redis, namespace: str, executed: int) -> dict[str, Any]:
    """The status once the counters have caught up and both workers are idle again (a
    worker completes its request just after handing the result to local waiters)."""
    deadline = time.monotonic() + 10
    while True:
        status = collect_status(client, namespace)
        idle = [w for w in status["workers"] if w["state"] == "idle"]
        if status["stats"]["executed"] >= executed and len(idle) == 2:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.05)


def test_status_figures_match_a_known_run(grid, grid_factory, client):
    assert grid.run(gf.wide(3)) == 12  # wide(3) and its three add(i, 3): 4 new calls
    assert grid.map(gf.add, [(i, 100) for i in range(10)]) == [i + 100 for i in range(10)]
    # another client of the same grid finds wide(3) already computed (a cache hit)
    other = grid_factory(workers=0, namespace=grid.namespace)
    assert other.run(gf.wide(3)) == 12

    status = settled(client, grid.namespace, executed=14)
    assert status["namespace"] == grid.namespace
    stats = status["stats"]
    assert (stats["submitted"], stats["executed"], stats["cached"], stats["failed"]) == (
        14, 14, 1, 0,
    )  # fmt: skip
    assert status["rates"]["cache_hit"] == pytest.approx(1 / 15)
    assert status["rates"]["sharing"] == 0
    assert status["pools"] == [
        {"name": "default", "workers": 2, "alive": 2, "busy": 0, "idle": 2, "dead": 0, "queued": 0}
    ]
    registered = grid.workers()
    assert {w["id"] for w in status["workers"]} == set(registered)
    for w in status["workers"]:
        assert (w["host"], w["pid"], w["pool"]) == (
            registered[w["id"]]["host"], registered[w["id"]]["pid"], "default",
        )  # fmt: skip
        assert w["state"] == "idle" and w["current"] is None
        assert 0 < w["uptime_s"] < 120
    assert status["keys"] == {"results": 14, "pending": 0, "calls": 14, "complete": True}
    assert status["totals"]["queued"] == 0

    # a worker whose heartbeat is gone is reported dead (the reaper may not have run yet)
    victim = status["workers"][0]["id"]
    client.delete(f"pg:{{{grid.namespace}}}:hb:{victim}")
    after = collect_status(client, grid.namespace)
    states = {w["id"]: w["state"] for w in after["workers"]}
    assert states[victim] == "dead"
    assert after["pools"][0]["dead"] == 1 and after["pools"][0]["alive"] == 1


def test_status_cli_json_and_tables(grid, client):
    grid.map(gf.add, [(i, 7) for i in range(5)])
    settled(client, grid.namespace, executed=5)
    runner = CliRunner()
    args = ["status", "--redis", grid.url, "--namespace", grid.namespace]
    result = runner.invoke(app, [*args, "--json", "--sample", "0.2"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["stats"]["executed"] == 5 and data["stats"]["submitted"] == 5
    assert len(data["workers"]) == 2 and data["pools"][0]["name"] == "default"
    assert data["calls_per_s"] == 0.0  # nothing ran during the sample
    assert data["failures"] == []

    result = runner.invoke(app, [*args, "--sample", "0"])
    assert result.exit_code == 0, result.output
    for text in ("Pools", "Workers", "default", "idle", "executed"):
        assert text in result.output

    result = runner.invoke(app, ["status", "--redis", "redis://127.0.0.1:1/0", "--sample", "0"])
    assert result.exit_code == 1
    assert "cannot reach" in result.output


def test_inspect_shows_children_parent_and_errors(grid, client):
    assert grid.run(gf.wide(3)) == 12
    with pytest.raises(pygirder.RemoteError):
        grid.run(gf.fail_level1(5))
    settled(client, grid.namespace, executed=7)
    runner = CliRunner()
    args = ["--redis", grid.url, "--namespace", grid.namespace]
    wide = gf.wide(3)
    kids = {gf.add(i, 3).id for i in range(3)}

    result = runner.invoke(app, ["inspect", wide.id[:10], *args, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert (info["id"], info["fn"], info["state"], info["summary"]) == (
        wide.id, "gridfuncs:wide", "done", "12",
    )  # fmt: skip
    assert info["parent"] is None and info["children_total"] == 3
    assert {c["id"] for c in info["children"]} == kids
    assert {c["fn"] for c in info["children"]} == {"gridfuncs:add"}
    assert all(c["state"] == "done" and c["duration_s"] is not None for c in info["children"])
    assert info["duration_s"] is not None and info["worker"] in grid.workers()

    result = runner.invoke(app, ["inspect", wide.id[:10], *args], terminal_width=160)
    assert result.exit_code == 0, result.output
    assert "gridfuncs:wide" in result.output and "Children (3)" in result.output
    for i in range(3):
        assert f"{{'a': {i}, 'b': 3}}" in result.output

    child = call_info(client, grid.namespace, gf.add(1, 3).id)
    assert child["parent"]["id"] == wide.id and child["ancestors"] == [child["parent"]]
    assert child["children_total"] == 0

    middle = call_info(client, grid.namespace, gf.fail_level2(5).id[:12])
    assert middle["state"] == "failed"
    assert middle["result"]["error"]["type"] == "gridfuncs.Boom"
    assert "bad input 5" in middle["result"]["error"]["traceback"]
    assert middle["parent"]["fn"] == "gridfuncs:fail_level1"
    assert [c["fn"] for c in middle["children"]] == ["gridfuncs:fail_level3"]

    # most recent first: the innermost call fails first, the root last
    failures = FailureScanner(client, grid.namespace).scan_all()
    assert [f["fn"] for f in failures] == [
        "gridfuncs:fail_level1",
        "gridfuncs:fail_level2",
        "gridfuncs:fail_level3",
    ]

    result = runner.invoke(app, ["inspect", "deadbeefdeadbeef", *args])
    assert result.exit_code == 1
    assert "no call 'deadbeefdeadbeef'" in result.output
    result = runner.invoke(app, ["inspect", "abc", *args])
    assert result.exit_code == 2
    with pytest.raises(CallLookupError):
        call_info(client, grid.namespace, "0123456789abcdef")
