"""Measurement plumbing shared by every benchmark: sizes, repetition, memory, Valkey counters.

Pieces:

- ``Sizes``: the workload sizes of a full and a ``--quick`` run, in one place.
- ``System``: the interface each system adapter (``sys_pygirder``, ``sys_ray``, ...)
  implements; a workload a system cannot express raises ``CannotExpress``, one that
  misses its deadline raises ``DidNotComplete``.
- ``RssSampler``: sums the RSS of a process and all its descendants every 50 ms, keeps
  the peak, and stops the benchmark (instead of the machine) when memory runs out.
- ``repeat``: a warm-up, then measured runs, then the median of every figure.
- ``valkey_commands`` / ``ping_rtt``: ``INFO commandstats`` and ``PING`` on a Valkey.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
MB = 1_000_000


class DidNotComplete(Exception):
    """The run missed its deadline (or ran out of memory); the system may be stuck."""


class CannotExpress(Exception):
    """The system has no way to write this workload as specified."""


@dataclass(frozen=True)
class Sizes:
    """Workload sizes and limits.  ``full()`` is the specification; ``quick_sizes()`` is a
    smoke test of about 1/20 that finishes in about three minutes."""

    quick: bool
    runs: int  # measured runs per figure (the median is reported)
    run_limit_s: float  # deadline of one measured run, unless a workload has its own
    b1_calls: int
    b2_calls: int
    b3_depth: int  # the tree has 2**(depth+1) - 1 calls
    b3_limit_s: float
    b4_n: int  # paths(n, n)
    b4_copies: int  # identical slow calls asked for at once
    b4_seconds: float  # duration of the slow call
    b6_children: int
    b6_total_s: float  # CPU seconds of all children together
    b7_calls: int
    b7_seconds: float
    b7_extra_limit_s: float  # how much longer than uncrashed a crashed run may take
    b8_calls: int
    b8_sizes: tuple[int, ...]
    b8_limit_s: float  # deadline of one B8 run (a stuck transfer should not cost 5 min)
    rss_limit_bytes: int  # a system whose processes exceed this is stopped

    @classmethod
    def full(cls) -> Sizes:
        return cls(
            quick=False, runs=5, run_limit_s=300.0, b1_calls=20_000, b2_calls=2_000,
            b3_depth=13, b3_limit_s=120.0, b4_n=16, b4_copies=200, b4_seconds=0.5,
            b6_children=400, b6_total_s=20.0, b7_calls=1_000, b7_seconds=0.05,
            b7_extra_limit_s=90.0, b8_calls=200, b8_sizes=(1 << 20, 10 << 20), b8_limit_s=120.0,
            rss_limit_bytes=12 << 30,
        )  # fmt: skip

    @classmethod
    def quick_sizes(cls) -> Sizes:
        return cls(
            quick=True, runs=3, run_limit_s=20.0, b1_calls=1_000, b2_calls=100,
            b3_depth=9, b3_limit_s=10.0, b4_n=12, b4_copies=10, b4_seconds=0.2,
            b6_children=40, b6_total_s=2.0, b7_calls=60, b7_seconds=0.05,
            b7_extra_limit_s=15.0, b8_calls=10, b8_sizes=(1 << 20, 10 << 20), b8_limit_s=20.0,
            rss_limit_bytes=8 << 30,
        )  # fmt: skip


def new_salt() -> str:
    """A fresh first argument: calls of a new run never match an earlier run's memo."""
    return uuid.uuid4().hex[:12]


class System:
    """What a workload asks of a system.  Every method takes a ``timeout`` in seconds and
    raises ``DidNotComplete`` when it passes; results come back in call order."""

    name = "?"
    #: Valkey the system runs on (for INFO commandstats), when it has one.
    valkey_url: str | None = None
    #: Commands that are client round trips on that Valkey (None: every command).
    round_trip_commands: frozenset[str] | None = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def conn_info(self) -> dict[str, Any]:
        """What a fresh client process needs to attach to this running system (B5)."""
        raise NotImplementedError

    def fan_out(self, salt: str, n: int, timeout: float) -> list[int]:
        raise CannotExpress("not implemented")

    def ping(self, salt: str, i: int, timeout: float) -> int:
        raise CannotExpress("not implemented")

    def tree(self, salt: str, depth: int, timeout: float) -> int:
        raise CannotExpress("not implemented")

    def shared(
        self, salt: str, n: int, copies: int, seconds: float, log: str, timeout: float
    ) -> dict[str, Any]:
        """B4: ``{"paths": paths(n, n), "slow": [result of each identical call]}``."""
        raise CannotExpress("not implemented")

    def skew(self, salt: str, durations: list[float], timeout: float) -> int:
        raise CannotExpress("not implemented")

    def naps(self, salt: str, n: int, seconds: float, timeout: float) -> list[Any]:
        """B7: results (or exception objects for calls that failed) in call order."""
        raise CannotExpress("not implemented")

    def victim(self) -> int:
        """B7: pid of a worker process that is running a nap right now."""
        raise CannotExpress("not implemented")

    def after_kill(self, pid: int) -> None:
        """B7: whatever the deployment's supervisor would do after a worker died."""

    def blobs(self, salt: str, n: int, size: int, timeout: float) -> list[bytes]:
        raise CannotExpress("not implemented")

    def release_blobs(self, salt: str, n: int, size: int) -> dict[str, Any]:
        """B8: drop stored results of a finished run so runs do not pile up in memory;
        returns figures about what was retained before that."""
        return {}

    def counters(self) -> dict[str, int]:
        """The system's own counters (pygirder: executed, shared, requeued, ...)."""
        return {}

    def extras(self) -> dict[str, Any]:
        """System-specific figures measured once (idle memory, per-queued-call memory)."""
        return {}


# -- process trees and memory ------------------------------------------------------
def process_tree(root: int) -> list[psutil.Process]:
    try:
        proc = psutil.Process(root)
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_rss(root: int) -> int:
    total = 0
    for proc in process_tree(root):
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def _available_bytes() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` (what ``psutil.virtual_memory`` reports),
    read without psutil's parse of the whole file into a named tuple."""
    with open("/proc/meminfo", "rb") as f:
        for line in f:
            if line.startswith(b"MemAvailable:"):
                return int(line.split()[1]) * 1024
    return psutil.virtual_memory().available


class ProcTree:
    """The RSS sum of a process tree, read from ``/proc`` at the cost of its own members.

    ``psutil.Process.children(recursive=True)`` reads the ``stat`` file of every process
    on the machine at each call (its parent map), which at a 50 ms period cost the
    benchmarked client 11 to 15 % of its CPU on a busy machine.  The tree here is as
    exact at each sample: it lists ``/proc`` (one ``getdents``), reads ``stat`` only of
    pids it has not seen and of the tree's members (whose ``stat`` also holds their
    RSS), and remembers the parent of every other pid, which does not change while it
    lives (an orphan is adopted by init or a subreaper outside the tree).  A pid that
    leaves the listing is forgotten, so a reused pid is read afresh.
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self._parents: dict[int, int] = {}  # pid -> parent pid, of pids outside the tree
        self._page = os.sysconf("SC_PAGE_SIZE")

    @staticmethod
    def _stat(pid: int) -> tuple[int, int] | None:
        """(parent pid, RSS in pages) of a live process, None if it is gone."""
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read()
        except OSError:
            return None
        fields = data[data.rindex(b")") + 2 :].split()  # the name may hold spaces
        return int(fields[1]), int(fields[21])

    def sample(self) -> tuple[int, int]:
        """(RSS bytes summed over the tree, number of processes in it)."""
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
        parents = self._parents
        listed = set(pids)
        for pid in [p for p in parents if p not in listed]:
            del parents[pid]
        children: dict[int, list[int]] = {}
        pages: dict[int, int] = {}  # of the pids read at this sample
        for pid in pids:
            parent = parents.get(pid)
            if parent is None:
                stat = self._stat(pid)
                if stat is None:
                    continue
                parent, pages[pid] = stat
                parents[pid] = parent
            children.setdefault(parent, []).append(pid)
        total = count = 0
        todo = [self.root]
        while todo:
            pid = todo.pop()
            parents.pop(pid, None)  # a member is read again at every sample
            if pid in pages:
                total += pages[pid] * self._page
                count += 1
            todo.extend(children.get(pid, ()))
        return total, count


class RssSampler:
    """Samples the RSS sum of a process tree; calls ``on_limit`` once if it grows too big.

    The limit also trips when the machine itself has less than 2 GB available, so a
    runaway peer (thousands of blocked worker processes) is stopped before it hurts
    anything else running here.
    """

    def __init__(
        self,
        root: int,
        *,
        limit: int,
        on_limit: Callable[[str], None],
        period: float = 0.05,
    ) -> None:
        self.root = root
        self.limit = limit
        self.on_limit = on_limit
        self.period = period
        self.peak = 0
        self.processes = 0
        self._tree = ProcTree(root)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def reset(self) -> None:
        self.peak = tree_rss(self.root)
        self.processes = 0

    @property
    def peak_mb(self) -> float:
        return round(self.peak / MB, 1)

    def _run(self) -> None:
        tripped = False
        while not self._stop.wait(self.period):
            total, count = self._tree.sample()
            self.peak = max(self.peak, total)
            self.processes = max(self.processes, count)
            if tripped:
                continue
            available = _available_bytes()
            if total > self.limit or available < 2 << 30:
                tripped = True
                self.on_limit(
                    f"stopped: its {count} processes used {total / MB:.0f} MB RSS "
                    f"(limit {self.limit / MB:.0f} MB; machine had {available / MB:.0f} MB "
                    "available)"
                )

    def stop(self) -> None:
        self._stop.set()


# -- statistics ----------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every numeric figure over the runs; booleans must hold in every run."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for r in runs for k in r):
        values = [r[key] for r in runs if key in r]
        if all(isinstance(v, bool) for v in values):
            out[key] = all(values)
        elif all(isinstance(v, int | float) for v in values):
            med = statistics.median(values)
            out[key] = round(med, 6) if isinstance(med, float) else med
        else:
            out[key] = values[-1]
    return out


def planned_runs(wanted: int, first_run_s: float) -> int:
    """Fewer repetitions for slow figures, so a full run stays well under an hour."""
    if first_run_s > 40:
        return 1
    if first_run_s > 10:
        return min(wanted, 3)
    return wanted


def repeat(
    run: Callable[[int], dict[str, Any]],
    *,
    sizes: Sizes,
    sampler: RssSampler,
    warmup: Callable[[], Any] | None = None,
    runs: int | None = None,
) -> dict[str, Any]:
    """Warm up once, then measure; returns the medians plus every run's raw figures."""
    if warmup is not None:
        warmup()
    wanted = runs or sizes.runs
    raw: list[dict[str, Any]] = []
    i = 0
    while i < wanted:
        sampler.reset()
        started = time.perf_counter()
        figures = run(i)
        elapsed = time.perf_counter() - started
        figures["peak_rss_mb"] = sampler.peak_mb
        raw.append(figures)
        if i == 0:
            wanted = planned_runs(wanted, elapsed)
        i += 1
    return {"median": summarize(raw), "runs": raw, "n_runs": len(raw)}


# -- Valkey ---------------------------------------------------------------------------
def valkey_commands(url: str) -> dict[str, int]:
    """Calls per command from ``INFO commandstats`` (commands run by scripts included)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def round_trips(
    before: dict[str, int], after: dict[str, int], counted: frozenset[str] | None
) -> int:
    """Client round trips between two commandstats snapshots (our own INFO excluded)."""
    total = 0
    for cmd, calls in after.items():
        if cmd in ("info", "ping") or (counted is not None and cmd not in counted):
            continue
        total += calls - before.get(cmd, 0)
    return total


def ping_rtt(url: str, n: int = 2000) -> dict[str, float]:
    """redis-py PING round trip on this Valkey, in microseconds."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        for _ in range(100):
            client.ping()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            client.ping()
            times.append(time.perf_counter() - t)
    finally:
        client.close()
    return {
        "p50_us": round(statistics.median(times) * 1e6, 1),
        "p99_us": round(percentile(times, 99) * 1e6, 1),
    }


def get_throughput(url: str, size: int, repeats: int = 20) -> float:
    """MB/s of redis-py GET of one ``size``-byte value: the store's own transfer rate."""
    import redis

    client = redis.Redis.from_url(url)
    key = "bench:floor:blob"
    try:
        client.set(key, os.urandom(size))
        client.get(key)
        started = time.perf_counter()
        for _ in range(repeats):
            client.get(key)
        elapsed = time.perf_counter() - started
        client.delete(key)
    finally:
        client.close()
    return round(size * repeats / elapsed / MB, 1)


def used_memory(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


def log_dir(system: str) -> str:
    """Where a system's worker processes log: under ``BENCH_LOG_DIR`` (set by run.py for
    its children, so the logs outlive them), else a new temporary directory."""
    import tempfile

    base = os.environ.get("BENCH_LOG_DIR")
    if not base:
        return tempfile.mkdtemp(prefix=f"{system}-bench-")
    path = os.path.join(base, f"{system}-workers-{os.getpid()}")
    os.makedirs(path, exist_ok=True)
    return path


def bench_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for worker processes: ``bench/`` importable and the durable result
    store off (a run must not be answered from an earlier one), nothing else changed."""
    env = dict(os.environ)
    paths = [BENCH_DIR, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYGIRDER_STORE"] = "off"  # runs compare the grid alone; bench/durable.py the store
    env.update(extra or {})
    return env


def stop_processes(procs: list[psutil.Process], grace: float = 5.0) -> None:
    """SIGTERM these processes (by pid), then SIGKILL whatever is left after ``grace``."""
    alive = []
    for proc in procs:
        try:
            proc.terminate()
            alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    _, still = psutil.wait_procs(alive, timeout=grace)
    for proc in still:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(still, timeout=grace)
