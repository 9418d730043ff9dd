"""The `pygirder` command: one-off calls, garbage collection, the demo, service options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

import gridfuncs as gf
import pygirder
from pygirder.errors import ConfigError
from pygirder.grid.maintenance import parse_age
from pygirder.observe.status import call_info
from pygirder.store.keys import Keys

TESTS = os.path.dirname(os.path.dirname(__file__))  # gridfuncs and the other helpers


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
    from pygirder.observe.logs import read_logs

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


def envelope_of(out: subprocess.CompletedProcess[str]) -> dict:
    """The one JSON envelope a --json command prints, and nothing else on stdout."""
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout + out.stderr
    envelope = json.loads(lines[0])
    assert set(envelope) == {"result", "error", "time_s", "id", "log"}
    return envelope


def test_submit_json_prints_the_service_envelope(grid_factory):
    grid = grid_factory(workers=1)
    on_grid = ("--redis", grid.url, "--namespace", grid.namespace, "--workers", "0")
    out = pygirder_cmd("submit", "gridfuncs:add", "--args", "[2, 3]", *on_grid, "--json",
                       "--id", "job-7")  # fmt: skip
    assert out.returncode == 0, out.stderr
    envelope = envelope_of(out)
    assert envelope["result"] == 5 and envelope["error"] is None and envelope["id"] == "job-7"
    assert envelope["time_s"] > 0

    failed = pygirder_cmd("submit", "gridfuncs:fail_level1", "--args", "[1]", *on_grid, "--json")
    assert failed.returncode == 1
    error = envelope_of(failed)["error"]
    assert error["type"] == "RemoteError" and "gridfuncs.Boom: bad input 1" in error["message"]
    assert "fail_level3" in error["message"]  # the call chain travels in the message


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["gridfuncs:record"], "is not a grid function"),
        (["gridfuncs:no_such_function"], "does not exist"),
        (["no_such_module:f"], "cannot import 'no_such_module'"),
        (["gridfuncs"], "expected MODULE:FUNCTION"),
        (["gridfuncs:add", "--args", "{nope"], "not valid JSON"),
        (["gridfuncs:add", "--kwargs", "[1]"], "takes a JSON object"),
        (["gridfuncs:add", "--workers", "many"], "'--workers'"),
    ],
)
def test_submit_mistakes_exit_2_with_an_envelope_and_no_traceback(argv, says):
    out = pygirder_cmd("submit", *argv, "--json", "--redis", "redis://127.0.0.1:1/0")
    assert out.returncode == 2, out.stdout + out.stderr
    error = envelope_of(out)["error"]
    assert says in error["message"] and error["traceback"] == ""
    plain = pygirder_cmd("submit", *argv, "--redis", "redis://127.0.0.1:1/0")
    assert plain.returncode == 2 and plain.stdout == ""
    assert says in plain.stderr and "Traceback" not in plain.stderr
    assert "--help" in plain.stderr  # says where to look next


def test_gc_json_and_its_errors(grid_factory):
    grid = grid_factory(workers=1)
    assert grid.run(gf.add(1, 2)) == 3
    out = pygirder_cmd("gc", "--older-than", "1h", "--redis", grid.url,
                       "--namespace", grid.namespace, "--dry-run", "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = envelope_of(out)["result"]
    assert result["dry_run"] is True and result["kept"] >= 1
    assert result["dropped"]["results"] == 0 and result["older_than"] == "1h"

    bad_age = pygirder_cmd("gc", "--older-than", "two hours", "--json")
    assert bad_age.returncode == 2
    assert "optional unit" in envelope_of(bad_age)["error"]["message"]
    down = pygirder_cmd("gc", "--older-than", "1h", "--redis", "redis://:hunter2@127.0.0.1:1/0")
    assert down.returncode == 1 and "Traceback" not in down.stderr
    assert "cannot reach the grid's server" in down.stderr and "pygirder server" in down.stderr
    assert "hunter2" not in down.stderr


def _cloud_config(tmp_path) -> str:
    pub = tmp_path / "id.pub"
    pub.write_text(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDrZ2/fj2i2RDlxzFQE/0li3aGxvKT7OXirOAyehzMF4 t@x\n"
    )
    toml = tmp_path / "pygirder.toml"
    toml.write_text(
        f'[cloud]\nname = "t"\nssh_from = "198.51.100.7/32"\npublic_key_file = "{pub}"\n'
        f'cluster_key_file = "{tmp_path / "cluster.pem"}"\nalert_email = "ops@example.com"\n'
    )
    return str(toml)


def test_cloud_run_json_prints_the_same_envelope(aws, tmp_path):
    from typer.testing import CliRunner

    from pygirder.cli.main import app

    toml = _cloud_config(tmp_path)
    cli = CliRunner()
    # No fleet is up on the (moto) account: the fleet lookup fails, exit 1.
    result = cli.invoke(app, ["cloud", "run", "gridfuncs:add", "--args", "[2, 3]",
                              "--project", TESTS, "--config", toml, "--json"])  # fmt: skip
    assert result.exit_code == 1, result.output
    envelope = json.loads(result.stdout)
    assert envelope["result"] is None and "fleet" in envelope["error"]["message"]
    # A mistake in the command line is exit 2, with the envelope, before AWS is asked.
    result = cli.invoke(app, ["cloud", "run", "gridfuncs:record", "--project", TESTS,
                              "--config", toml, "--json"])  # fmt: skip
    assert result.exit_code == 2
    assert "is not a grid function" in json.loads(result.stdout)["error"]["message"]

    # With a grid to reach, the result is in the envelope. The route to a fleet's
    # grid is replaced by a local grid's URL (the fleet tests cover the route itself).
    with pygirder.connect(workers=1) as grid:  # a fleet's grid uses the default namespace
        run = f"""
import contextlib, sys
from pygirder.cloud import fleet
fleet.grid_url = lambda *a, **k: contextlib.nullcontext({grid.url!r})
from pygirder.cli.main import main
sys.argv = ["pygirder", "cloud", "run", "--project", {TESTS!r}, "--config", {toml!r},
            *sys.argv[1:]]
main()
"""
        env = dict(os.environ, PYTHONPATH=TESTS)

        def cloud_run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-c", run, *args], capture_output=True,
                                  text=True, timeout=60, env=env, cwd=TESTS)  # fmt: skip

        ok = cloud_run("gridfuncs:add", "--args", "[2, 3]", "--json")
        assert ok.returncode == 0, ok.stderr
        envelope = envelope_of(ok)
        assert envelope["result"] == 5 and envelope["error"] is None
        failed = cloud_run("gridfuncs:fail_level1", "--args", "[1]", "--json")
        assert failed.returncode == 1
        assert envelope_of(failed)["error"]["type"] == "RemoteError"
        plain = cloud_run("gridfuncs:add", "--args", "[2, 3]")
        assert plain.returncode == 0 and plain.stdout.strip() == "5"
        plain = cloud_run("gridfuncs:fail_level1", "--args", "[1]")
        assert plain.returncode == 1 and "gridfuncs.Boom: bad input 1" in plain.stderr


def test_submit_timeout_and_interrupt_end_with_an_error_not_a_hang(grid_factory, tmp_path):
    import signal

    grid = grid_factory(workers=2)  # one for each slow call
    log = str(tmp_path / "log")
    on_grid = ("--redis", grid.url, "--namespace", grid.namespace, "--workers", "0")
    out = pygirder_cmd("submit", "gridfuncs:slow", "--args", json.dumps([1, 4, log]), *on_grid,
                       "--timeout", "0.5", "--json")  # fmt: skip
    assert out.returncode == 1  # a GridTimeout, not the result of the 4 s call
    assert envelope_of(out)["error"]["type"] == "GridTimeout"

    env = dict(os.environ, PYTHONPATH=TESTS)
    argv = [sys.executable, "-m", "pygirder", "submit", "gridfuncs:slow", "--args",
            json.dumps([2, 4, log]), *on_grid]  # fmt: skip
    with subprocess.Popen(argv, cwd=TESTS, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:  # fmt: skip
        deadline = time.monotonic() + 30
        logged = Path(log)
        while "slow:2" not in (logged.read_text() if logged.exists() else ""):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        # The call runs, so the client is blocked in grid.run: it submitted it there.
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 1 and stdout == ""
    assert "interrupted by SIGINT" in stderr and "Traceback" not in stderr


@pytest.mark.slow
def test_demo_json_is_one_envelope_with_the_workloads():
    out = pygirder_cmd("demo", "--depth", "3", "--fanout", "3", "--steps", "8", "--workers", "2",
                       "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = envelope_of(out)["result"]  # no start line or progress bar on stdout
    assert result["ok"] is True and result["workers"] == 2
    lattice = next(w for w in result["workloads"] if w["name"] == "lattice 8 steps")
    assert lattice["executed"] == 45 and lattice["made"] == 73 and lattice["reused"] == 28


def test_demo_sizes_are_checked_before_a_grid_starts():
    out = pygirder_cmd("demo", "--depth", "1")
    assert out.returncode == 2 and "--depth" in out.stderr and "2 or more" in out.stderr
    out = pygirder_cmd("demo", "--steps", "0", "--json")
    assert out.returncode == 2 and "--steps" in envelope_of(out)["error"]["message"]
