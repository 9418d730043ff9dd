"""Reading a grid's results after it is gone: a grid without workers, and no grid at all.

A private grid started with ``workers=0`` answers its calls from the store on the
client side, and fails at once (``NotStored``) what the store cannot answer;
``ResultStore.result(call)`` reads one value with no server.  Real folders, real moto
S3 (server mode), real worker processes for the grids that compute.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_durable_grid import JOB, run_job

import pygirder
from pygirder import codec
from pygirder.grid.protocol import encode_error
from pygirder.results import Item, open_store

# the job of test_durable_grid (leaf, total, fails_for_good, ...), with another main
SCRIPT = (
    JOB.partition('if __name__ == "__main__":')[0]
    + """
def outcome(grid, call):
    try:
        return {"value": grid.run(call, timeout=60)}
    except pygirder.NotStored as exc:
        return {"not_stored": exc.reason, "message": str(exc), "id": exc.call_id}
    except pygirder.RemoteError as exc:
        return {"remote": exc.message}


if __name__ == "__main__":
    workers = int(os.environ["READER_WORKERS"])
    with pygirder.connect(workers=workers) as grid:
        out = {
            "total": outcome(grid, total(6)),
            "error": outcome(grid, fails_for_good(1)),
            "missing": outcome(grid, leaf(99)),
            "stats": grid.stats(),
        }
    print(json.dumps(out))
"""
)


def run_script(
    tmp_path: Path, workers: int, source: str = SCRIPT
) -> tuple[dict[str, Any], list[str]]:
    """Run the script once in its own process; returns its output and what it executed."""
    return run_job(tmp_path, source, READER_WORKERS=str(workers))


@pytest.mark.slow
def test_a_grid_without_workers_reads_what_a_grid_with_workers_stored(tmp_path: Path) -> None:
    first, ran = run_script(tmp_path, workers=2)
    assert first["total"] == {"value": sum(i * i for i in range(6))}
    assert first["missing"] == {"value": 99 * 99}
    assert len(ran) == 1 + 6 + 1 + 1  # total, its leaves, the kept error, leaf(99)
    (tmp_path / "exec.log").unlink()
    second, ran_again = run_script(tmp_path, workers=0)
    assert ran_again == []  # nothing executed anywhere
    assert second["total"] == first["total"]
    assert second["missing"] == {"value": 99 * 99}
    # a stored error comes back as the error, since the function keeps its errors
    assert second["error"] == first["error"] and "never 1" in second["error"]["remote"]
    stats = second["stats"]
    assert stats["restored"] == 3 and stats.get("executed", 0) == 0, stats


@pytest.mark.slow
def test_a_call_the_store_does_not_hold_fails_at_once_and_says_how_to_fix_it(
    tmp_path: Path,
) -> None:
    out, ran = run_script(tmp_path, workers=0)  # an empty store
    assert ran == []
    missing = out["missing"]
    assert missing["not_stored"] == "missing"
    assert "no workers" in missing["message"] and str(tmp_path / "store") in missing["message"]
    assert "start workers" in missing["message"] and "check the store URL" in missing["message"]
    assert len(missing["id"]) == 40
    # each failed at once, well inside its 60 s timeout, and none is left queued
    assert out["total"]["not_stored"] == "missing"
    assert out["stats"]["cancelled"] == 3, out["stats"]


@pytest.mark.slow
def test_a_stale_result_is_refused(tmp_path: Path) -> None:
    run_script(tmp_path, workers=2)
    changed = SCRIPT.replace("return i * i", "return i * i + 1")
    out, ran = run_script(tmp_path, workers=0, source=changed)
    assert ran == []
    # total has the same code (so the same id) and is stored, but it waited on the old
    # leaf: it must not answer; leaf(99) has new code, so it is a new call, not stored
    assert out["total"]["not_stored"] == "stale"
    assert "__main__:leaf, which has other code now" in out["total"]["message"]
    assert out["missing"]["not_stored"] == "missing"
    assert out["stats"].get("restored", 0) == 1  # the kept error only


def test_a_grid_without_workers_and_without_a_store_fails_at_once() -> None:
    import gridfuncs as gf

    with pygirder.connect(workers=0, store=None) as grid:
        with pytest.raises(pygirder.NotStored, match="result store is off"):
            grid.run(gf.add(1, 2), timeout=60)
        future = grid.submit(gf.add(2, 2))
        with pytest.raises(pygirder.NotStored, match="start workers"):
            future.result(timeout=60)


def test_a_grid_without_workers_runs_calls_once_workers_are_added(tmp_path: Path) -> None:
    import gridfuncs as gf

    with pygirder.connect(workers=0, store=tmp_path / "store") as grid:
        with pytest.raises(pygirder.NotStored):
            grid.run(gf.add(1, 2), timeout=60)
        grid.add_workers(1)
        assert grid.run(gf.add(1, 2), timeout=60) == 3


@pytest.mark.slow
def test_a_grid_without_workers_reads_a_fleets_results_from_s3(aws: Any, tmp_path: Path) -> None:
    import boto3

    import gridfuncs as gf

    boto3.client("s3").create_bucket(Bucket="fleet-results")
    store, log = "s3://fleet-results/results", str(tmp_path / "exec.log")
    calls = [(i, 100, 0.0, log) for i in range(8)]
    with pygirder.connect(workers=2, namespace="fleet", store=store) as grid:
        first = grid.map(gf.sized, calls, timeout=60)
    with pygirder.connect(workers=0, store=store) as grid:  # the fleet is gone
        second = grid.map(gf.sized, calls, timeout=60)
        with pytest.raises(pygirder.NotStored, match="s3://fleet-results/results"):
            grid.run(gf.sized(99, 100, 0.0, log), timeout=60)
        stats = grid.stats()
    assert second == first
    assert len(gf.count(log)) == 8  # nothing ran twice
    assert stats["restored"] == 8 and stats.get("executed", 0) == 0, stats
    with open_store(store) as opened:  # and with no grid at all
        assert opened.result(gf.sized(3, 100, 0.0, log)) == bytes([3]) * 100
        with pytest.raises(LookupError, match="holds no result"):
            opened.result(gf.sized(99, 100, 0.0, log))


def test_the_store_reads_one_value_with_no_server(tmp_path: Path) -> None:
    import gridfuncs as gf

    call, missing, failed = gf.add(20, 22), gf.add(1, 1), gf.fail_level3(1)
    error = pygirder.RemoteError("ValueError", "level 3 failed", "", [])
    with open_store(tmp_path / "store") as store:
        store.put_many([
            Item(call.id, b"O" + codec.encode(42), call.function.name,
                 call.function.fingerprint),
            Item(failed.id, encode_error(error), failed.function.name,
                 failed.function.fingerprint),
        ])  # fmt: skip
        assert store.result(call) == 42
        with pytest.raises(pygirder.NotStored, match="holds no result") as miss:
            store.result(missing)
        assert isinstance(miss.value, LookupError) and miss.value.call_id == missing.id
        assert miss.value.reason == "missing"
        # an error of a function that does not keep errors is not an answer
        with pytest.raises(pygirder.NotStored, match="does not keep errors") as refused:
            store.result(failed)
        assert refused.value.reason == "error"


def test_the_store_refuses_a_result_that_waited_on_other_code(tmp_path: Path) -> None:
    import gridfuncs as gf

    call = gf.add(5, 5)
    deps = ((gf.chain.name, "0" * 16), (gf.add.name, gf.add.fingerprint))
    with open_store(tmp_path / "store") as store:
        store.put_many([Item(call.id, b"O" + codec.encode(10), call.function.name,
                             call.function.fingerprint, deps)])  # fmt: skip
        with pytest.raises(pygirder.NotStored, match="chain, which has other code now") as exc:
            store.result(call)
        assert exc.value.reason == "stale"
