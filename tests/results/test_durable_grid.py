"""The memo outlives the run: workers read through the durable store and write to it.

Real Valkey servers, real worker processes, a real store folder.  Scripts run as
``python job.py`` in their own processes, the way users run them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import pygirder
from pygirder.results.local import LocalStore
from pygirder.server import EmbeddedServer

JOB = """
import json, os, sys
import pygirder

LOG = os.environ["JOB_LOG"]


def record(what):
    with open(LOG, "a") as fh:
        fh.write(what + "\\n")


@pygirder.fn
def leaf(i):
    record(f"leaf:{i}")
    return i * i


@pygirder.fn
def total(n):
    record(f"total:{n}")
    return sum(pygirder.wait(*[leaf(i) for i in range(n)]))


@pygirder.fn
def other(i):
    record(f"other:{i}")
    return -i


@pygirder.fn
def fails(i):
    record(f"fails:{i}")
    raise ValueError(f"no {i}")


@pygirder.fn(cache_errors=True)
def fails_for_good(i):
    record(f"fails_for_good:{i}")
    raise ValueError(f"never {i}")


if __name__ == "__main__":
    with pygirder.connect(workers=2) as grid:
        out = {
            "total": grid.run(total(12), timeout=60),
            "other": grid.map(other, [(i,) for i in range(5)], timeout=60),
        }
        for f in (fails, fails_for_good):
            try:
                grid.run(f(1), timeout=60)
            except pygirder.RemoteError as exc:
                out[f.__name__] = exc.message
        out["stats"] = grid.stats()
    print(json.dumps(out))
"""


def run_job(tmp_path: Path, source: str = JOB, **env: str) -> tuple[dict[str, Any], list[str]]:
    """Run the job script once; returns its output and the calls it executed."""
    script = tmp_path / "job.py"
    script.write_text(source)
    log = tmp_path / "exec.log"
    before = log.read_text().splitlines() if log.exists() else []
    full_env = {
        **os.environ, "JOB_LOG": str(log), "PYGIRDER_STORE": str(tmp_path / "store"), **env,
    }  # fmt: skip
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=full_env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    after = log.read_text().splitlines() if log.exists() else []
    return json.loads(out.stdout.strip().splitlines()[-1]), after[len(before) :]


@pytest.mark.slow
def test_a_script_run_twice_recomputes_nothing_the_second_time(tmp_path: Path) -> None:
    first, ran = run_job(tmp_path)
    assert first["total"] == sum(i * i for i in range(12))
    assert len(ran) == 1 + 12 + 5 + 2
    assert first["stats"].get("restored", 0) == 0
    second, ran_again = run_job(tmp_path)
    # a fresh server and fresh workers: every answer came from the store, except the
    # error that is not kept (errors are stored only with cache_errors=True)
    assert ran_again == ["fails:1"]
    assert {k: v for k, v in second.items() if k != "stats"} == {
        k: v for k, v in first.items() if k != "stats"
    }
    assert second["stats"]["restored"] == 1 + 5 + 1  # total, the five others, the kept error
    assert second["stats"].get("executed", 0) == 1


@pytest.mark.slow
def test_changing_one_function_recomputes_it_and_its_callers_only(tmp_path: Path) -> None:
    run_job(tmp_path)
    changed = JOB.replace("return i * i", "return i * i + 1")
    second, ran = run_job(tmp_path, changed)
    assert second["total"] == sum(i * i + 1 for i in range(12))
    # leaf has new code: its calls are new; total waited on the old leaf, so its stored
    # result is stale and it runs again; `other` is untouched and comes from the store
    assert sorted(ran) == sorted(["total:12", *[f"leaf:{i}" for i in range(12)], "fails:1"])


@pytest.mark.slow
def test_a_corrupted_object_is_recomputed(tmp_path: Path) -> None:
    run_job(tmp_path)
    with LocalStore(tmp_path / "store") as store:
        [victim] = [m for m in store.iterate() if m.function == "__main__:other"][:1]
        # truncated (a small result lives in the index; a large one would be a file)
        store._db.execute(
            "UPDATE objects SET object = substr(object, 1, length(object) - 3) WHERE id = ?",
            (victim.id,),
        )
    second, ran = run_job(tmp_path)
    assert second["other"] == [0, -1, -2, -3, -4]
    # the damaged result is computed again, and only it (the error is never kept)
    assert (
        len(ran) == 2 and "fails:1" in ran and ran[0 if ran[1] == "fails:1" else 1][:6] == "other:"
    )


@pytest.mark.slow
def test_store_off_keeps_nothing(tmp_path: Path) -> None:
    run_job(tmp_path, PYGIRDER_STORE="off")
    _, ran = run_job(tmp_path, PYGIRDER_STORE="off")
    assert len(ran) == 1 + 12 + 5 + 2
    assert not (tmp_path / "store").exists()


# -- the hot tier: Valkey restarts and maxmemory ---------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_an_empty_server_restart_finishes_from_the_store(tmp_path: Path) -> None:
    import gridfuncs as gf

    def tree_size(depth: int, fanout: int) -> int:
        return sum(fanout**d for d in range(depth + 1))

    port, store, log = _free_port(), tmp_path / "store", str(tmp_path / "exec.log")
    server = EmbeddedServer(port=port).start()
    grid = pygirder.connect(server.url, workers=2, namespace="restart", store=store)
    depth, fanout = 5, 3
    try:
        tree = gf.chaos_tree(depth, fanout, 0, 0.01, log)
        running = ThreadPoolExecutor(1).submit(grid.run, tree, timeout=90)
        deadline = time.monotonic() + 30
        while len(gf.count(log)) < 120:  # well under way, and far from done (364 calls)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.stop()  # an empty restart: no persistence, every result in Valkey is gone
        time.sleep(1.0)  # what the workers finished before is written to the store by now
        for pid in grid.worker_pids():  # and fresh workers: nothing remembered in memory
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        with LocalStore(store) as opened:
            durable = {m.id for m in opened.iterate()}
        server = EmbeddedServer(port=port).start()
        assert running.result(timeout=90) == tree_size(depth, fanout)
        stats = grid.stats()  # counted by the new server
    finally:
        grid.close()
        server.stop()
    assert durable, "nothing was stored before the restart"
    ran = gf.count(log)
    again = {node for node, times in ran.items() if times > 1}
    ids = {f"node:{d}:{k}": gf.chaos_tree(d, fanout, k, 0.01, log).id
           for d in range(depth + 1) for k in range(fanout ** (depth - d))}  # fmt: skip
    # only what was never stored ran twice; what was stored came back from the store
    assert not {node for node in again if ids[node] in durable}
    assert stats.get("restored", 0) >= 1


@pytest.mark.slow
def test_results_beyond_maxmemory_complete_and_a_rerun_comes_from_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gridfuncs as gf

    monkeypatch.setenv("PYGIRDER_HOT_TTL", "1")
    store, log = tmp_path / "store", str(tmp_path / "exec.log")
    size, n = 512 * 1024, 120  # 60 MB of results through a server capped at 48 MB
    calls = [(i, size, 0.05, log) for i in range(n)]
    import redis

    with (
        EmbeddedServer(password="pw-durable-mem", maxmemory="48mb") as server,
        pygirder.connect(server.url, workers=2, namespace="mem", store=store) as grid,
    ):
        out = grid.map(gf.sized, calls, timeout=120)
        assert [len(v) for v in out] == [size] * n
        assert out[7] == bytes([7]) * size
        client = redis.Redis.from_url(server.url)
        try:
            peak = int(client.info("memory")["used_memory_peak"])
        finally:
            client.close()
    assert peak <= 48 * 1024**2
    assert len(gf.count(log)) == n
    with (
        EmbeddedServer(password="pw-durable-mem", maxmemory="48mb") as server,
        pygirder.connect(server.url, workers=2, namespace="mem", store=store) as grid,
    ):
        again = grid.map(gf.sized, calls, timeout=120)
        stats = grid.stats()
    assert again == out
    assert len(gf.count(log)) == n  # nothing ran again
    assert stats["restored"] == n and stats.get("executed", 0) == 0, stats


@pytest.mark.slow
def test_a_second_grid_answers_the_first_ones_calls_from_s3(aws: Any, tmp_path: Path) -> None:
    """Two grids that share nothing but an S3 store (fleets a week apart)."""
    import boto3

    import gridfuncs as gf

    boto3.client("s3").create_bucket(Bucket="fleet-results")
    store, log = "s3://fleet-results/results", str(tmp_path / "exec.log")
    calls = [(i, 1000, 0.0, log) for i in range(20)]
    with pygirder.connect(workers=2, namespace="first", store=store) as grid:
        first = grid.map(gf.sized, calls, timeout=60)
    keys = boto3.client("s3").list_objects_v2(Bucket="fleet-results", Prefix="results/")
    assert keys["KeyCount"] == 20
    with pygirder.connect(workers=2, namespace="second", store=store) as grid:
        second = grid.map(gf.sized, calls, timeout=60)
        stats = grid.stats()
    assert second == first
    assert len(gf.count(log)) == 20  # the second grid executed nothing
    assert stats["restored"] == 20 and stats.get("executed", 0) == 0
