"""Pools, the distributor hierarchy, and work sharing under skew, on real processes."""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import pytest

import gridfuncs as gf

TESTS = os.path.dirname(os.path.dirname(__file__))  # gridfuncs and the other helpers


@pytest.fixture
def processes():
    """Start `pygirder worker`/`distributor` processes; all are stopped at the end."""
    started: list[subprocess.Popen] = []
    env = dict(os.environ, PYTHONPATH=TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def start(grid, *args: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "pygirder", *args, "--redis", grid.url,
               "--namespace", grid.namespace]  # fmt: skip
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.terminate()
    for proc in started:
        proc.wait(30)


def worker(start, grid, pool: str) -> None:
    start(grid, "worker", "--pool", pool, "--import", "gridfuncs")


def test_function_and_call_pools(grid_factory, processes):
    grid = grid_factory(workers=0)
    worker(processes, grid, "default")
    worker(processes, grid, "big")
    grid.wait_for_workers(2, timeout=30)
    assert grid.run(gf.on_big(1), timeout=30) == "big"  # @fn(pool="big")
    assert grid.run(gf.pool_of(1, 0), timeout=30) == "default"
    assert grid.run(gf.pool_of.options(pool="big")(2, 0), timeout=30) == "big"
    # sub-calls that name no pool stay in the pool their caller runs in (fresh arguments:
    # the pool is not part of a call's identity, so pool_of(1, 0) is already memoized)
    assert grid.run(gf.spawn.options(pool="big")(6, 0.5), timeout=30) == ["big"] * 6


@pytest.fixture
def hierarchy(grid_factory, processes):
    """root <- child-a (1 worker), root <- child-b (1 worker)."""
    grid = grid_factory(workers=0)
    for child in ("child-a", "child-b"):
        worker(processes, grid, child)
        processes(grid, "distributor", "--pool", child, "--parent", "root")
    grid.wait_for_workers(4, timeout=30)  # two workers and two distributors register
    return grid


@pytest.mark.slow
def test_work_submitted_to_the_parent_spreads_over_both_children(hierarchy):
    calls = [gf.pool_of.options(pool="root")(i, 20) for i in range(40)]
    pools = collections.Counter(hierarchy.wait(calls, timeout=60))
    assert set(pools) == {"child-a", "child-b"}, pools
    assert hierarchy.stats().get("distributed", 0) >= 40


@pytest.mark.slow
def test_overflow_of_a_busy_child_moves_to_its_idle_sibling(hierarchy):
    # one call in child-a makes 40 children; they start on child-a's local stack
    pools = collections.Counter(hierarchy.run(gf.spawn.options(pool="child-a")(40, 20), 60))
    assert pools["child-b"] >= 5, pools
    assert pools["child-a"] >= 5, pools


def test_skewed_children_keep_both_workers_busy(grid_factory):
    grid = grid_factory(workers=2)
    ran_on = collections.Counter(grid.run(gf.skewed(80, 1), timeout=60))
    assert len(ran_on) == 2, ran_on
    assert min(ran_on.values()) >= 80 * 0.25, ran_on
