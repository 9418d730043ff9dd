"""The workloads, written once against ``harness.System`` and run for every system.

Each ``bN`` function takes a started system and returns ``{workload key: outcome}``;
an outcome is ``{"status", "value", "unit", "median", "runs", ...}`` or a status other
than ``"ok"`` with a ``reason``.  ``run.py`` runs them in a child process per system.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import harness
import tasks_common as common
from harness import CannotExpress, DidNotComplete, RssSampler, Sizes, new_salt

Outcome = dict[str, Any]
Workload = Callable[["Context"], dict[str, Outcome]]


class Context:
    """What a workload needs besides the system: sizes, the memory sampler, a scratch dir."""

    def __init__(self, system: harness.System, sizes: Sizes, sampler: RssSampler) -> None:
        self.system = system
        self.sizes = sizes
        self.sampler = sampler
        self.scratch = tempfile.mkdtemp(prefix="bench-scratch-")
        self.shared_runs: list[dict[str, Any]] = []  # B4 runs, for B5 to rerun

    def commands(self) -> dict[str, int] | None:
        url = self.system.valkey_url
        return harness.valkey_commands(url) if url else None

    def counter_deltas(self, before: dict[str, int]) -> dict[str, int]:
        """What the system's own counters say happened since ``before`` (``grid_*``)."""
        after = self.system.counters()
        return {f"grid_{k}": v - before.get(k, 0) for k, v in after.items() if v != before.get(k)}

    def round_trips(self, before: dict[str, int] | None, calls: int) -> dict[str, float]:
        if before is None:
            return {}
        after = self.commands()
        assert after is not None
        total = harness.round_trips(before, after, self.system.round_trip_commands)
        return {"valkey_cmds_per_call": round(total / calls, 3)}


def ok(result: dict[str, Any], primary: str, unit: str, **extra: Any) -> Outcome:
    return {"status": "ok", "value": result["median"][primary], "unit": unit, **result, **extra}


def failed(status: str, reason: str, **extra: Any) -> Outcome:
    return {"status": status, "reason": reason, **extra}


def guarded(ctx: Context, keys: list[str], body: Callable[[], dict[str, Outcome]]) -> dict:
    """Run a workload; a missed deadline or an impossible workload becomes its outcome."""
    try:
        return body()
    except DidNotComplete as exc:
        peak = ctx.sampler.peak_mb
        return {
            k: failed(
                "did not complete", str(exc), peak_rss_mb=peak, processes=ctx.sampler.processes
            )
            for k in keys
        }
    except CannotExpress as exc:
        return {k: failed("cannot express", str(exc)) for k in keys}


# -- B0 -----------------------------------------------------------------------------
def b0(ctx: Context) -> dict[str, Outcome]:
    """Start to first result: a fresh process starts the system and makes one call."""
    sz = ctx.sizes
    script = os.path.join(harness.BENCH_DIR, "first_result.py")

    def run(_i: int) -> dict[str, Any]:
        proc = subprocess.Popen(
            [sys.executable, script, ctx.system.name, str(sz.run_limit_s)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=harness.bench_env(),
            start_new_session=True,
        )  # fmt: skip
        try:
            out, err = proc.communicate(timeout=sz.run_limit_s + 60)
        except subprocess.TimeoutExpired:
            harness.stop_processes(harness.process_tree(proc.pid), grace=2)
            proc.communicate()
            raise DidNotComplete(f"no first result within {sz.run_limit_s + 60:.0f}s") from None
        lines = out.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise DidNotComplete(f"the fresh process failed: {err.strip()[-800:]}")
        got = json.loads(lines[-1])
        if got.get("status") != "ok":
            raise DidNotComplete(got.get("reason", "the fresh process failed"))
        return {k: got[k] for k in ("first_s", "start_s", "correct")}

    def body() -> dict[str, Outcome]:
        result = harness.repeat(run, sizes=sz, sampler=ctx.sampler)
        return {"B0": ok(result, "first_s", "s")}

    return guarded(ctx, ["B0"], body)


# -- B1 -----------------------------------------------------------------------------
def b1(ctx: Context) -> dict[str, Outcome]:
    """Fan-out: n empty calls with distinct arguments, gathered; calls per second."""
    sys_, sz = ctx.system, ctx.sizes
    n = sz.b1_calls

    def run(_i: int) -> dict[str, Any]:
        salt = new_salt()
        before, counted = ctx.commands(), sys_.counters()
        started = time.perf_counter()
        values = sys_.fan_out(salt, n, sz.run_limit_s)
        wall = time.perf_counter() - started
        return {
            "calls_per_s": round(n / wall, 1),
            "wall_s": round(wall, 4),
            "correct": values == list(range(n)),
            **ctx.round_trips(before, n),
            **ctx.counter_deltas(counted),
        }

    def body() -> dict[str, Outcome]:
        result = harness.repeat(
            run,
            sizes=sz,
            sampler=ctx.sampler,
            warmup=lambda: sys_.fan_out(new_salt(), max(100, n // 10), sz.run_limit_s),
        )
        return {"B1": ok(result, "calls_per_s", "calls/s")}

    return guarded(ctx, ["B1"], body)


# -- B2 -----------------------------------------------------------------------------
def b2(ctx: Context) -> dict[str, Outcome]:
    """Ping-pong: sequential submit-and-wait of one empty call; p50 and p99 latency."""
    sys_, sz = ctx.system, ctx.sizes
    n = sz.b2_calls

    def run(_i: int) -> dict[str, Any]:
        salt = new_salt()
        before = ctx.commands()
        latencies = []
        for i in range(n):
            started = time.perf_counter()
            sys_.ping(salt, i, 30.0)
            latencies.append(time.perf_counter() - started)
        return {
            "p50_ms": round(harness.percentile(latencies, 50) * 1e3, 4),
            "p99_ms": round(harness.percentile(latencies, 99) * 1e3, 4),
            "mean_ms": round(sum(latencies) / n * 1e3, 4),
            **ctx.round_trips(before, n),
        }

    def warmup() -> None:
        salt = new_salt()
        for i in range(max(20, n // 10)):
            sys_.ping(salt, i, 30.0)

    def body() -> dict[str, Outcome]:
        result = harness.repeat(run, sizes=sz, sampler=ctx.sampler, warmup=warmup)
        return {"B2": ok(result, "p50_ms", "ms (p50)", p99_ms=result["median"]["p99_ms"])}

    return guarded(ctx, ["B2"], body)


# -- B3 -----------------------------------------------------------------------------
def b3(ctx: Context) -> dict[str, Outcome]:
    """Nested blocking recursion: a binary tree where every node waits on its children."""
    sys_, sz = ctx.system, ctx.sizes
    depth = sz.b3_depth
    expected = common.tree_size(depth)

    def run(_i: int) -> dict[str, Any]:
        salt = new_salt()
        counted = sys_.counters()
        started = time.perf_counter()
        value = sys_.tree(salt, depth, sz.b3_limit_s)
        wall = time.perf_counter() - started
        return {
            "wall_s": round(wall, 4),
            "calls": expected,
            "correct": value == expected,
            "processes": ctx.sampler.processes,
            **ctx.counter_deltas(counted),
        }

    def body() -> dict[str, Outcome]:
        result = harness.repeat(
            run,
            sizes=sz,
            sampler=ctx.sampler,
            warmup=lambda: sys_.tree(new_salt(), min(depth, 5), sz.b3_limit_s),
        )
        return {"B3": ok(result, "wall_s", "s", peak_rss_mb=result["median"]["peak_rss_mb"])}

    return guarded(ctx, ["B3"], body)


# -- B4 and B5 ------------------------------------------------------------------------
def _shared_figures(log: str, n: int, copies: int, out: dict[str, Any]) -> dict[str, Any]:
    counts = common.count(log)
    paths_exec = sum(v for k, v in counts.items() if k.startswith("paths:"))
    unique = (n + 1) * (n + 1) - 1
    slow_exec = counts.get("slow", 0)
    return {
        "executions": paths_exec + slow_exec,
        "unique_calls": unique + 1,
        "paths_executions": paths_exec,
        "slow_executions": slow_exec,
        "repeated_executions": paths_exec + slow_exec - unique - 1,
        "correct": out["paths"] == common.paths_value(n) and out["slow"] == [1] * copies,
    }


def b4(ctx: Context) -> dict[str, Outcome]:
    """Shared sub-calls: paths(n, n) plus ``copies`` identical slow calls, all at once."""
    sys_, sz = ctx.system, ctx.sizes
    n, copies, seconds = sz.b4_n, sz.b4_copies, sz.b4_seconds

    def run(i: int) -> dict[str, Any]:
        salt = new_salt()
        log = os.path.join(ctx.scratch, f"b4-{salt}.log")
        counted = sys_.counters()
        started = time.perf_counter()
        out = sys_.shared(salt, n, copies, seconds, log, sz.run_limit_s)
        wall = time.perf_counter() - started
        ctx.shared_runs.append({"salt": salt, "log": log, "wall_s": wall})
        return {
            "wall_s": round(wall, 4),
            **_shared_figures(log, n, copies, out),
            **ctx.counter_deltas(counted),
        }

    def warmup() -> None:
        salt = new_salt()
        log = os.path.join(ctx.scratch, f"b4-warm-{salt}.log")
        sys_.shared(salt, 3, 2, 0.01, log, sz.run_limit_s)

    def body() -> dict[str, Outcome]:
        result = harness.repeat(run, sizes=sz, sampler=ctx.sampler, warmup=warmup)
        med = result["median"]
        return {"B4": ok(result, "wall_s", "s", executions=med["executions"])}

    return guarded(ctx, ["B4"], body)


def b5(ctx: Context) -> dict[str, Outcome]:
    """Warm rerun of B4 from a fresh client process attached to the same system."""
    sys_, sz = ctx.system, ctx.sizes
    n, copies, seconds = sz.b4_n, sz.b4_copies, sz.b4_seconds
    if not ctx.shared_runs:  # B5 alone: one cold run first, not reported
        salt = new_salt()
        log = os.path.join(ctx.scratch, f"b4-{salt}.log")
        started = time.perf_counter()
        sys_.shared(salt, n, copies, seconds, log, sz.run_limit_s)
        ctx.shared_runs.append({"salt": salt, "log": log, "wall_s": time.perf_counter() - started})
    cold = sorted(r["wall_s"] for r in ctx.shared_runs)[len(ctx.shared_runs) // 2]

    def run(i: int) -> dict[str, Any]:
        prior = ctx.shared_runs[i % len(ctx.shared_runs)]
        before = sum(common.count(prior["log"]).values())
        spec = {
            "system": sys_.name, "conn": sys_.conn_info(), "salt": prior["salt"],
            "log": prior["log"], "n": n, "copies": copies, "seconds": seconds,
            "timeout": sz.run_limit_s,
        }  # fmt: skip
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, os.path.join(harness.BENCH_DIR, "fresh_client.py"), json.dumps(spec)],
            capture_output=True, text=True, timeout=sz.run_limit_s + 60, env=harness.bench_env(),
        )  # fmt: skip
        process_s = time.perf_counter() - started
        if proc.returncode != 0:
            raise DidNotComplete(f"fresh client failed: {proc.stderr.strip()[-800:]}")
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        if got.get("status") != "ok":
            raise DidNotComplete(got.get("reason", "fresh client failed"))
        executions = sum(common.count(prior["log"]).values()) - before
        return {
            "time_s": got["time_s"],
            "connect_s": got["connect_s"],
            "process_s": round(process_s, 4),
            "executions": executions,
            "speedup_vs_cold": round(cold / got["time_s"], 1),
            "correct": got["correct"],
        }

    def body() -> dict[str, Outcome]:
        result = harness.repeat(run, sizes=sz, sampler=ctx.sampler)
        return {
            "B5": ok(
                result,
                "time_s",
                "s",
                cold_s=round(cold, 4),
                speedup_vs_cold=result["median"]["speedup_vs_cold"],
            )
        }

    return guarded(ctx, ["B5"], body)


# -- B6 -----------------------------------------------------------------------------
def b6(ctx: Context) -> dict[str, Outcome]:
    """Skew: one parent spawns CPU-bound children of log-normal durations."""
    sys_, sz = ctx.system, ctx.sizes
    durations = common.skew_durations(sz.b6_children, sz.b6_total_s)
    ideal = sum(durations) / 2

    def run(_i: int) -> dict[str, Any]:
        salt = new_salt()
        counted = sys_.counters()
        started = time.perf_counter()
        value = sys_.skew(salt, durations, sz.run_limit_s)
        wall = time.perf_counter() - started
        return {
            "over_ideal": round(wall / ideal, 4),
            "makespan_s": round(wall, 4),
            "ideal_s": round(ideal, 4),
            "longest_child_s": max(durations),
            "correct": value == sum(range(len(durations))),
            **ctx.counter_deltas(counted),
        }

    def body() -> dict[str, Outcome]:
        short = common.skew_durations(10, 0.2)
        result = harness.repeat(
            run,
            sizes=sz,
            sampler=ctx.sampler,
            warmup=lambda: sys_.skew(new_salt(), short, sz.run_limit_s),
        )
        med = result["median"]
        return {"B6": ok(result, "over_ideal", "x ideal", makespan_s=med["makespan_s"])}

    return guarded(ctx, ["B6"], body)


# -- B7 -----------------------------------------------------------------------------
def b7(ctx: Context) -> dict[str, Outcome]:
    """Crash: n 50 ms calls; one worker process is SIGKILLed halfway through."""
    sys_, sz = ctx.system, ctx.sizes
    n, seconds = sz.b7_calls, sz.b7_seconds
    expected = [2 * i for i in range(n)]

    def wrong(values: list[Any]) -> int:
        if len(values) != n:
            return n
        return sum(1 for v, e in zip(values, expected, strict=True) if v != e)

    def clean(_i: int) -> dict[str, Any]:
        salt = new_salt()
        started = time.perf_counter()
        values = sys_.naps(salt, n, seconds, sz.run_limit_s)
        return {"wall_s": round(time.perf_counter() - started, 4), "wrong": wrong(values)}

    def body() -> dict[str, Outcome]:
        base = harness.repeat(
            clean,
            sizes=sz,
            sampler=ctx.sampler,
            warmup=lambda: sys_.naps(new_salt(), 20, 0.01, sz.run_limit_s),
        )
        uncrashed = base["median"]["wall_s"]
        limit = uncrashed + sz.b7_extra_limit_s

        def crashed(_i: int) -> dict[str, Any]:
            salt = new_salt()
            box: dict[str, Any] = {}

            def go() -> None:
                try:
                    box["values"] = sys_.naps(salt, n, seconds, limit)
                except Exception as exc:  # DidNotComplete included
                    box["error"] = exc

            worker = threading.Thread(target=go, daemon=True)
            counted = sys_.counters()
            started = time.perf_counter()
            worker.start()
            time.sleep(uncrashed / 2)
            pid = sys_.victim()
            os.kill(pid, signal.SIGKILL)
            killed_at = time.perf_counter() - started
            sys_.after_kill(pid)
            worker.join(limit + 5)
            wall = time.perf_counter() - started
            if worker.is_alive() or isinstance(box.get("error"), DidNotComplete):
                raise DidNotComplete(
                    f"after SIGKILL of worker pid {pid} at {killed_at:.1f}s, not every result "
                    f"arrived within {limit:.0f}s (uncrashed: {uncrashed:.1f}s)"
                )
            if "error" in box:
                raise box["error"]
            bad = wrong(box["values"])
            errors = sorted({type(v).__name__ for v in box["values"] if isinstance(v, Exception)})
            return {
                "extra_s": round(wall - uncrashed, 4),
                "wall_s": round(wall, 4),
                "killed_at_s": round(killed_at, 3),
                "wrong": bad,
                "correct": bad == 0,
                "errors": ",".join(errors),
                **ctx.counter_deltas(counted),
            }

        hit = harness.repeat(crashed, sizes=sz, sampler=ctx.sampler)
        med = hit["median"]
        return {
            "B7": ok(
                hit,
                "extra_s",
                "s extra",
                correct=med["correct"],
                uncrashed_s=uncrashed,
                uncrashed_runs=base["runs"],
            )
        }

    return guarded(ctx, ["B7"], body)


# -- B8 -----------------------------------------------------------------------------
def b8(ctx: Context) -> dict[str, Outcome]:
    """Payload: n calls returning 1 MB (then 10 MB) byte strings; MB/s delivered."""
    sys_, sz = ctx.system, ctx.sizes
    n = sz.b8_calls
    outcomes: dict[str, Outcome] = {}
    for size in sz.b8_sizes:
        key = f"B8-{size >> 20}MB"

        def run(_i: int, size: int = size) -> dict[str, Any]:
            salt = new_salt()
            started = time.perf_counter()
            values = sys_.blobs(salt, n, size, sz.b8_limit_s)
            wall = time.perf_counter() - started
            good = all(common.check_payload(i, size, v) for i, v in enumerate(values))
            del values
            retained = sys_.release_blobs(salt, n, size)
            return {
                "mb_per_s": round(n * size / wall / harness.MB, 1),
                "wall_s": round(wall, 4),
                "correct": good,
                **retained,
            }

        def body(size: int = size, key: str = key) -> dict[str, Outcome]:
            def warmup() -> None:
                salt = new_salt()
                sys_.blobs(salt, 4, size, sz.b8_limit_s)
                sys_.release_blobs(salt, 4, size)

            result = harness.repeat(run, sizes=sz, sampler=ctx.sampler, warmup=warmup)
            return {key: ok(result, "mb_per_s", "MB/s")}

        outcomes.update(guarded(ctx, [key], body))
    return outcomes


WORKLOADS: dict[str, Workload] = {
    "B0": b0, "B1": b1, "B2": b2, "B3": b3, "B4": b4, "B5": b5, "B6": b6, "B7": b7, "B8": b8,
}  # fmt: skip
