"""B5b: the second run of a script over a warm durable store, and what writing through costs.

    python bench/durable.py [--quick] [--json FILE]

* **B5b**: B4 (``paths(n, n)`` plus ``copies`` identical slow calls) on a fresh Valkey
  with fresh workers and a store in a temporary folder (the cold run), then the same
  calls again on another fresh Valkey with fresh workers over that store (the warm run:
  the second run of a script).  Reports both times, their ratio and the executions of
  the warm run (0: everything came from the store).
* **write-through**: B1 (``b1_calls`` empty calls, calls/s) and B8 (``b8_calls`` calls
  returning 1 MB, MB/s) with the store off and on, alternating, each run on a fresh
  system; the medians and the cost of the store in per cent.

Everything is local: the store lives in a temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

import harness  # noqa: E402
import tasks_common as common  # noqa: E402
from harness import Sizes, new_salt  # noqa: E402
from sys_pygirder import PygirderSystem  # noqa: E402


def started(store: str | None) -> PygirderSystem:
    system = PygirderSystem({"PYGIRDER_STORE": store or "off"})
    system.start()
    return system


def b4_once(system: PygirderSystem, sizes: Sizes, salt: str, log: str) -> float:
    t0 = time.perf_counter()
    out = system.shared(salt, sizes.b4_n, sizes.b4_copies, sizes.b4_seconds, log,
                        sizes.run_limit_s)  # fmt: skip
    wall = time.perf_counter() - t0
    assert out["paths"] == common.paths_value(sizes.b4_n), out
    return wall


def b5b(sizes: Sizes, scratch: str) -> dict[str, Any]:
    """Cold and warm runs of B4, each on a fresh server with fresh workers."""
    cold, warm, executed, restarts = [], [], [], []
    for run in range(sizes.runs):
        store = os.path.join(scratch, f"store-{run}")
        salt, log = new_salt(), os.path.join(scratch, f"b5b-{run}.log")
        system = started(store)
        try:
            cold.append(b4_once(system, sizes, salt, log))
        finally:
            system.stop()  # the workers flush what they still have to write
        before = sum(common.count(log).values())
        t1 = time.perf_counter()
        system = started(store)
        up = time.perf_counter() - t1
        try:
            warm.append(b4_once(system, sizes, salt, log))
            restarts.append(up + warm[-1])
            executed.append(sum(common.count(log).values()) - before)
            stats = system.g.stats()
        finally:
            system.stop()
    cold_s, warm_s = statistics.median(cold), statistics.median(warm)
    return {
        "cold_s": round(cold_s, 4),
        "warm_s": round(warm_s, 4),
        "speedup": round(cold_s / warm_s, 1),
        "warm_with_start_s": round(statistics.median(restarts), 4),
        "warm_executions": max(executed),
        "warm_grid_stats": stats,
        "runs": len(cold),
    }


def write_through(sizes: Sizes, scratch: str) -> dict[str, Any]:
    """B1 and B8 (1 MB) with the store off and on: the medians and the cost in %.

    The two settings alternate, each run on a fresh system (off, on, off, on...), so a
    machine whose load drifts during the benchmark weighs on both alike.
    """
    rates: dict[str, list[float]] = {"off": [], "on": []}
    mbs: dict[str, list[float]] = {"off": [], "on": []}
    size, n = 1 << 20, sizes.b8_calls
    for run in range(sizes.runs):
        for label in ("off", "on"):
            system = started(None if label == "off" else os.path.join(scratch, f"wt-{run}"))
            try:
                system.fan_out(new_salt(), max(100, sizes.b1_calls // 10), sizes.run_limit_s)
                t0 = time.perf_counter()
                values = system.fan_out(new_salt(), sizes.b1_calls, sizes.run_limit_s)
                rates[label].append(sizes.b1_calls / (time.perf_counter() - t0))
                assert values == list(range(sizes.b1_calls))
                salt = new_salt()
                t0 = time.perf_counter()
                system.blobs(salt, n, size, sizes.b8_limit_s)
                mbs[label].append(n * size / (time.perf_counter() - t0) / harness.MB)
                system.release_blobs(salt, n, size)
            finally:
                system.stop()
    out: dict[str, Any] = {}
    for label in ("off", "on"):
        out[f"B1_{label}_calls_per_s"] = round(statistics.median(rates[label]), 1)
        out[f"B8_1MB_{label}_mb_per_s"] = round(statistics.median(mbs[label]), 1)
    out["B1_runs"] = {k: [round(v) for v in r] for k, r in rates.items()}
    out["B1_cost_pct"] = round(100 * (1 - out["B1_on_calls_per_s"] / out["B1_off_calls_per_s"]), 1)
    out["B8_cost_pct"] = round(
        100 * (1 - out["B8_1MB_on_mb_per_s"] / out["B8_1MB_off_mb_per_s"]), 1
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, 3 runs")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    sizes = Sizes.quick_sizes() if args.quick else Sizes.full()
    if args.quick:
        os.environ.setdefault("PYGIRDER_HEARTBEAT_TTL", "2")
    scratch = tempfile.mkdtemp(prefix="bench-durable-")
    try:
        report = {"quick": args.quick, "B5b": b5b(sizes, scratch),
                  "write_through": write_through(sizes, scratch)}  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
