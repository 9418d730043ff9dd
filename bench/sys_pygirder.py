"""pygirder under benchmark: a private Valkey, two worker processes we start, one client.

The workers are plain ``python -m pygirder worker`` processes started here (not by
``connect()``), so the crash benchmark knows their pids; after it kills one, its
requests are requeued at once and a replacement is started half a second later, as
``pygirder worker --processes N``'s supervisor does.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import threading
import time
from typing import Any

import harness
import psutil
import tasks_pygirder as tp
from harness import DidNotComplete

import pygirder
from pygirder.server import EmbeddedServer

NAMESPACE = "bench"
WORKERS = 2


class PygirderSystem(harness.System):
    name = "pygirder"
    # Commands pygirder's processes send themselves (scripts' own commands excluded).
    round_trip_commands = frozenset({"evalsha", "eval", "fcall", "blmove", "blmpop", "mget"})

    def __init__(self, extra_env: dict[str, str] | None = None) -> None:
        self.extra_env = dict(extra_env or {})  # for the workers (bench/durable.py: a store)
        self.server: EmbeddedServer | None = None
        self.url = ""
        self.grid: pygirder.Grid | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.log_dir = harness.log_dir("pygirder")

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        self.server = EmbeddedServer().start()
        self.url = self.valkey_url = self.server.url
        for _ in range(WORKERS):
            self._spawn_worker()
        self.grid = pygirder.connect(self.url, workers=0, namespace=NAMESPACE)
        self.grid.wait_for_workers(WORKERS, timeout=60)

    def _spawn_worker(self) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "pygirder", "worker", "--redis", self.url,
               "--namespace", NAMESPACE, "--import", "tasks_pygirder"]  # fmt: skip
        log = open(os.path.join(self.log_dir, f"worker-{len(self.workers)}.log"), "wb")  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=harness.bench_env(self.extra_env),
            )  # fmt: skip
        finally:
            log.close()
        self.workers.append(proc)
        return proc

    def stop(self) -> None:
        if self.grid is not None:
            self.grid.close()
        harness.stop_processes([psutil.Process(p.pid) for p in self.workers if p.poll() is None])
        for proc in self.workers:
            proc.wait()
        if self.server is not None:
            self.server.stop()

    def conn_info(self) -> dict[str, Any]:
        return {"url": self.url}

    @classmethod
    def attach(cls, info: dict[str, Any]) -> PygirderSystem:
        self = cls()
        self.url = self.valkey_url = info["url"]
        self.grid = pygirder.connect(self.url, workers=0, namespace=NAMESPACE)
        return self

    def detach(self) -> None:
        if self.grid is not None:
            self.grid.close()

    @property
    def g(self) -> pygirder.Grid:
        assert self.grid is not None
        return self.grid

    # -- workloads ------------------------------------------------------------------
    def fan_out(self, salt: str, n: int, timeout: float) -> list[int]:
        try:
            return self.g.map(tp.noop, [(salt, i) for i in range(n)], timeout=timeout)
        except pygirder.GridTimeout as exc:
            raise DidNotComplete(str(exc)) from None

    def ping(self, salt: str, i: int, timeout: float) -> int:
        try:
            return self.g.run(tp.noop(salt, i), timeout=timeout)
        except pygirder.GridTimeout as exc:
            raise DidNotComplete(str(exc)) from None

    def tree(self, salt: str, depth: int, timeout: float) -> int:
        try:
            return self.g.run(tp.tree(salt, depth, 0), timeout=timeout)
        except pygirder.GridTimeout as exc:
            raise DidNotComplete(f"no result within {timeout:.0f}s ({exc})") from None

    def shared(
        self, salt: str, n: int, copies: int, seconds: float, log: str, timeout: float
    ) -> dict[str, Any]:
        # The recursion exactly as written in DESIGN.md; the 200 identical calls are
        # submitted one by one, as 200 independent callers in this process would.
        slow = [self.g.submit(tp.slow(salt, seconds, log)) for _ in range(copies)]
        top = self.g.submit(tp.paths(salt, n, n, log))
        _done, pending = concurrent.futures.wait([top, *slow], timeout=timeout)
        if pending:
            raise DidNotComplete(f"{len(pending)} results missing after {timeout:.0f}s")
        return {"paths": top.result(), "slow": [f.result() for f in slow]}

    def skew(self, salt: str, durations: list[float], timeout: float) -> int:
        try:
            return self.g.run(tp.skew_parent(salt, durations), timeout=timeout)
        except pygirder.GridTimeout as exc:
            raise DidNotComplete(str(exc)) from None

    def naps(self, salt: str, n: int, seconds: float, timeout: float) -> list[Any]:
        try:
            return self.g.map(tp.nap, [(salt, i, seconds) for i in range(n)], timeout=timeout)
        except pygirder.GridTimeout as exc:
            raise DidNotComplete(str(exc)) from None
        except pygirder.RemoteError as exc:
            return [exc]

    def victim(self) -> int:
        return next(p.pid for p in self.workers if p.poll() is None)

    def after_kill(self, pid: int) -> None:
        # What `pygirder worker --processes N` does: reap the child, requeue its requests
        # at once (not when its heartbeat expires), and start a replacement at once (its
        # first restart has no backoff).
        next(p for p in self.workers if p.pid == pid).wait()
        try:
            from pygirder.grid.recovery import DeadChildRecovery
        except ImportError:  # older code: the heartbeat TTL is all there is
            pass
        else:
            DeadChildRecovery(self.url, NAMESPACE)(pid)
        self._spawn_worker()

    def blobs(self, salt: str, n: int, size: int, timeout: float) -> list[bytes]:
        try:
            return self.g.map(tp.blob, [(salt, i, size) for i in range(n)], timeout=timeout)
        except pygirder.GridTimeout as exc:
            raise DidNotComplete(str(exc)) from None

    def release_blobs(self, salt: str, n: int, size: int) -> dict[str, Any]:
        """Measure what the run left behind, then free it.

        Results have no TTL by default (they are the memo), and every process -- the
        client and each worker -- keeps recent results it saw, up to 64 MiB
        (``PYGIRDER_CACHE_BYTES``).  Left alone, six runs of 200 x 10 MB would hold 12 GB
        in Valkey, so after recording how much was retained this deletes the results,
        empties the client cache and restarts the workers (outside the measured time).
        """
        import redis

        from pygirder.store.keys import Keys

        retained = {
            "retained_client_rss_mb": round(psutil.Process().memory_info().rss / harness.MB),
            "retained_worker_rss_mb": round(sum(self.worker_rss()) / harness.MB),
            "retained_valkey_mb": round(harness.used_memory(self.url) / harness.MB),
        }
        keys = Keys(NAMESPACE)
        client = redis.Redis.from_url(self.url)
        try:
            ids = [tp.blob(salt, i, size).id for i in range(n)]
            for start in range(0, len(ids), 100):
                client.delete(*(keys.result(i) for i in ids[start : start + 100]))
        finally:
            client.close()
        runtime = self.g.runtime
        assert runtime is not None
        forget = getattr(runtime, "forget_cached", None)
        if forget is None:  # older code, without a public way
            runtime._cache.clear()
        else:
            forget()
        self.restart_workers()
        return retained

    def worker_rss(self) -> list[int]:
        out = []
        for proc in self.workers:
            if proc.poll() is None:
                try:
                    out.append(psutil.Process(proc.pid).memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
        return out

    def restart_workers(self) -> None:
        """Replace every worker with a fresh process (to measure memory they retain)."""
        old = [p for p in self.workers if p.poll() is None]
        harness.stop_processes([psutil.Process(p.pid) for p in old], grace=30)
        for proc in old:
            proc.wait()
        for _ in old:
            self._spawn_worker()
        deadline = time.monotonic() + 60
        while len(self.g.workers()) < WORKERS and time.monotonic() < deadline:
            time.sleep(0.05)

    def counters(self) -> dict[str, int]:
        return self.g.stats()

    # -- once-only figures ------------------------------------------------------------
    def extras(self) -> dict[str, Any]:
        """Idle worker RSS, and Valkey memory per queued call (10,000 queued, no workers)."""
        import redis

        from pygirder.store.keys import Keys

        time.sleep(1.0)
        rss = self.worker_rss()
        n = 10_000
        keys = Keys("bench-queued")  # a namespace no worker serves
        client = redis.Redis.from_url(self.url)
        before = harness.used_memory(self.url)
        try:
            with pygirder.connect(self.url, workers=0, namespace=keys.namespace) as grid:
                # grid.map submits in batches; it waits in a thread we abandon (grid.submit
                # per call fails past 100 outstanding calls: see README, "Also noticed")
                args = [("queued", i) for i in range(n)]
                waiting = threading.Thread(target=_quietly, args=(grid.map, tp.noop, args))
                waiting.start()
                deadline = time.monotonic() + 60
                while client.llen(keys.queue("default")) < n and time.monotonic() < deadline:
                    time.sleep(0.05)
                after = harness.used_memory(self.url)
                queued = client.llen(keys.queue("default"))
                one = tp.noop("queued", 0).id
                per_key = {
                    "state_hash": client.memory_usage(keys.state(one)),
                    "waiters_set": client.memory_usage(keys.waiters(one)),
                    "call_graph_hash": client.memory_usage(keys.call(one)),
                    "queue_entry": round((client.memory_usage(keys.queue("default")) or 0) / n),
                }
            waiting.join(10)
            for batch in _chunks(list(client.scan_iter(f"{keys.prefix}*", 1000)), 500):
                client.delete(*batch)
        finally:
            client.close()
        return {
            "valkey_ping_us": harness.ping_rtt(self.url),
            "valkey_get_mb_s_1MB": harness.get_throughput(self.url, 1 << 20),
            "valkey_get_mb_s_10MB": harness.get_throughput(self.url, 10 << 20),
            "idle_worker_rss_mb": round(sum(rss) / len(rss) / harness.MB, 1) if rss else None,
            "queued_calls": queued,
            "bytes_per_queued_call": round((after - before) / n),
            "bytes_per_queued_call_by_key": per_key,
            "queued_call_note": "Valkey used_memory delta / 10,000 calls submitted with no "
            "worker; MEMORY USAGE of one call's keys in bytes_per_queued_call_by_key",
        }


def _quietly(fn: Any, *args: Any) -> None:
    """Run ``fn`` for its side effects; the grid closing under it is expected."""
    try:
        fn(*args, timeout=30)
    except Exception:
        pass


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
