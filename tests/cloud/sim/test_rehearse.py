"""``pygirder cloud rehearse``: the whole flow on its own moto server and data plane.

Run as the command a user runs, in a subprocess: it starts its own moto server (moto's
backends are per process, so it cannot share the test session's) and prints its
timeline as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

STEPS = [
    "local AWS", "setup", "data plane", "image", "artifact push", "up", "job", "exec",
    "down", "proof", "second fleet up", "job from the store", "second down",
    "data plane stop", "teardown",
]  # fmt: skip


def test_rehearse_with_one_worker_is_refused_at_once(tmp_path: Path) -> None:
    # The job step reclaims a worker mid-job: with only one, the job could never finish.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PYGIRDER_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "pygirder", "cloud", "rehearse", "--workers", "1",
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "at least 2 workers" in proc.stderr and "--workers 2" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "state").exists()  # refused before anything started


ELASTIC_STEPS = [
    "reclaim 2, replace", "grow to 7", "shrink to 3", "elastic job", "rebalance 1",
    "idle to zero", "wake on work",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_rehearse_the_elastic_fleet(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PYGIRDER_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "pygirder", "cloud", "rehearse", "--workers", "3", "--elastic",
         "--job-seconds", "6", "--state-dir", str(tmp_path / "state"), "--json"],
        capture_output=True, text=True, timeout=580, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    names = [s["name"] for s in report["steps"]]
    assert names == STEPS[:8] + ELASTIC_STEPS + STEPS[8:]
    assert all(s["ok"] for s in report["steps"]), report["steps"]
    assert report["result"] == report["expected"] == 256 * 255 // 2
    steps = {s["name"]: s for s in report["steps"]}
    assert "1 redis, 1 distributor, 3 worker ready" in steps["up"]["detail"]
    assert "spot notice to worker" in steps["job"]["detail"]
    assert "while the job ran" in steps["job"]["detail"]
    assert "3 workers serving again" in steps["reclaim 2, replace"]["detail"]
    assert "3 worker live" in steps["shrink to 3"]["detail"]
    assert "(correct)" in steps["elastic job"]["detail"]
    assert "(correct)" in steps["wake on work"]["detail"]
    assert report["replacement_s"] is not None
    # a second fleet, after the first is gone, answers the job from S3 and runs nothing
    assert " 0 executed" in steps["job from the store"]["detail"]
    rebalance = report["rebalance_s"]  # the replacement serves before the drain ends
    assert "drained and terminated" in steps["rebalance 1"]["detail"]
    assert "(correct)" in steps["rebalance 1"]["detail"]
    assert rebalance["serving"] < rebalance["drained"]
    assert report["leftovers"] and not any(report["leftovers"].values())
    # every instance of the first fleet was sampled: the 3 workers and those launched later
    rss = report["peak_rss_bytes"]
    assert len(rss["redis"]) == len(rss["distributor"]) == 1
    assert len(rss["worker"]) >= 3 and all(rss["worker"])
