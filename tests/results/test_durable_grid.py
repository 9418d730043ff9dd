"""The memo outlives the run: workers read through the durable store and write to it.

Real Valkey servers, real worker processes, a real store folder.  Scripts run as
``python job.py`` in their own processes, the way users run them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pygirder.results.local import LocalStore

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
        path = store.path(victim.id)
    data = path.read_bytes()
    path.write_bytes(data[:-3])  # truncated
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
