"""B6's timeline: which worker process ran which child when, and where the idle time went.

    python bench/skew_timeline.py [--children 40] [--total 2.0] [--runs 5] [--verbose]

B6 reports makespan / (total CPU / 2), and on a shared machine its children's CPU
seconds stretch into several wall seconds each, for every system alike.  This runs
B6's workload (seed 42) on pygirder's two worker processes and has every child note
its process and wall-clock start and end in a side file.  Per run it prints the CPU the
workers used beyond the children's, each process's children, busy time and gaps, and
``over_busy``: the makespan over half the children's summed wall time, what B6's
ratio would be if the load stretched nothing but the children.  Compare code versions
by putting one first on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import harness
import psutil
import tasks_common as common

import pygirder
from pygirder.server import EmbeddedServer

NAMESPACE = "timeline"


@pygirder.fn
def timed_burn(salt: str, k: int, seconds: float, log: str) -> int:
    """One B6 child that notes where and when it ran."""
    started = time.time()
    common.burn(seconds)
    line = {"k": k, "pid": os.getpid(), "t0": started, "t1": time.time()}
    with open(log, "a") as fh:  # O_APPEND: one write per line, safe across processes
        fh.write(json.dumps(line) + "\n")
    return k


@pygirder.fn
def timed_parent(salt: str, durations: list[float], log: str) -> int:
    """B6's parent: spawns every child and waits for all of them."""
    kids = [timed_burn(salt, k, d, log) for k, d in enumerate(durations)]
    return sum(pygirder.wait(kids))


def summarize(lines: list[dict[str, Any]], t0: float, t1: float, verbose: bool) -> float:
    makespan = t1 - t0
    by_pid: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    for line in lines:
        by_pid[line["pid"]].append(line)
    busy = 0.0
    for pid, kids in sorted(by_pid.items()):
        kids.sort(key=lambda x: x["t0"])
        own = sum(x["t1"] - x["t0"] for x in kids)
        busy += own
        gaps = [b["t0"] - a["t1"] for a, b in itertools.pairwise(kids)]
        print(f"  pid {pid}: {len(kids)} children, busy {own:.3f} s, first start "
              f"+{kids[0]['t0'] - t0:.3f}, last end +{kids[-1]['t1'] - t0:.3f}, gaps "
              f"{sum(gaps):.3f} s (max {max(gaps, default=0):.3f})")  # fmt: skip
        if verbose:
            print("   ", " ".join(f"{x['k']}@{x['t0'] - t0:.2f}-{x['t1'] - t0:.2f}" for x in kids))
    over_busy = makespan / (busy / 2)
    print(f"  makespan {makespan:.3f} s, idle {2 * makespan - busy:.3f} worker-s "
          f"({1 - busy / (2 * makespan):.1%}), over_busy {over_busy:.3f}")  # fmt: skip
    return over_busy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--children", type=int, default=40)
    parser.add_argument("--total", type=float, default=2.0, help="CPU seconds of all children")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--verbose", action="store_true", help="print every child")
    args = parser.parse_args(argv)
    # the workers import this file as skew_timeline: call its functions by that name
    from skew_timeline import timed_parent

    durations = common.skew_durations(args.children, args.total)
    server = EmbeddedServer().start()
    cmd = [sys.executable, "-m", "pygirder", "worker", "--redis", server.url,
           "--namespace", NAMESPACE, "--import", "skew_timeline"]  # fmt: skip
    env = harness.bench_env()
    workers = [subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL) for _ in range(2)]
    ratios = []
    try:
        with pygirder.connect(server.url, workers=0, namespace=NAMESPACE) as grid, \
                tempfile.TemporaryDirectory() as folder:  # fmt: skip
            grid.wait_for_workers(2, timeout=60)
            warm = os.path.join(folder, "warm.log")
            grid.run(timed_parent(harness.new_salt(), common.skew_durations(10, 0.2), warm), 60)
            procs = [psutil.Process(proc.pid) for proc in workers]
            for run in range(args.runs):
                log = os.path.join(folder, f"run-{run}.log")
                cpu = sum(sum(p.cpu_times()[:2]) for p in procs)
                t0 = time.time()
                grid.run(timed_parent(harness.new_salt(), durations, log), timeout=600)
                t1 = time.time()
                cpu = sum(sum(p.cpu_times()[:2]) for p in procs) - cpu
                with open(log) as fh:
                    lines = [json.loads(line) for line in fh]
                print(f"run {run}: {len(lines)} child runs for {len(durations)} children, "
                      f"worker CPU {cpu:.2f} s, {cpu - args.total:.2f} s beyond the "
                      f"children's (load average {os.getloadavg()[0]:.1f})")  # fmt: skip
                ratios.append(summarize(lines, t0, t1, args.verbose))
    finally:
        for proc in workers:
            proc.terminate()
        for proc in workers:
            proc.wait(30)
        server.stop()
    print(f"over_busy median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
