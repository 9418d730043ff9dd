"""Celery under benchmark: one prefork worker (concurrency 2) on a private Valkey.

The Valkey (pygirder's ``EmbeddedServer``) is both the broker (db 0) and the result
backend (db 1).  The worker runs as a subprocess:
``celery -A tasks_celery worker --concurrency 2 --prefetch-multiplier 1 -O fair`` with
``task_acks_late=True`` (set in ``tasks_celery``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import defaultdict
from typing import Any

import harness
import psutil
import tasks_common
from harness import DidNotComplete

from pygirder.server import EmbeddedServer


def _tasks() -> Any:
    """Import the task module once BENCH_CELERY_URL is set (it configures the app)."""
    import tasks_celery

    return tasks_celery


class CelerySystem(harness.System):
    name = "celery"
    round_trip_commands = None  # kombu and the backend send every command themselves

    def __init__(self) -> None:
        self.server: EmbeddedServer | None = None
        self.base_url = ""
        self.worker: subprocess.Popen[bytes] | None = None
        self.log_dir = harness.log_dir("celery")
        self._last_blobs: Any = None

    def start(self) -> None:
        self.server = EmbeddedServer().start()
        self.valkey_url = self.server.url
        self.base_url = self.server.url.rsplit("/", 1)[0]
        os.environ["BENCH_CELERY_URL"] = self.base_url
        ct = _tasks()
        cmd = [sys.executable, "-m", "celery", "-A", "tasks_celery", "worker",
               "--concurrency", "2", "--prefetch-multiplier", "1", "-O", "fair",
               "--pool", "prefork", "--without-gossip", "--without-mingle",
               "--without-heartbeat", "--loglevel", "WARNING", "-n", "bench@localhost"]  # fmt: skip
        log = open(os.path.join(self.log_dir, "worker.log"), "wb")  # noqa: SIM115
        try:
            self.worker = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=harness.bench_env({"BENCH_CELERY_URL": self.base_url}),
            )  # fmt: skip
        finally:
            log.close()
        deadline = time.monotonic() + 60
        while len(self._pool()) < 2:
            if time.monotonic() > deadline or self.worker.poll() is not None:
                raise RuntimeError(f"celery worker did not start; see {self.log_dir}/worker.log")
            time.sleep(0.1)
        ct.noop.delay("ready", 0).get(timeout=60)

    def _pool(self) -> list[psutil.Process]:
        if self.worker is None or self.worker.poll() is not None:
            return []
        return psutil.Process(self.worker.pid).children()

    def stop(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            # a warm shutdown waits for running tasks forever (B3 leaves blocked ones)
            procs = [psutil.Process(self.worker.pid), *self._pool()]
            harness.stop_processes(procs, grace=5)
            self.worker.wait()
        if self.server is not None:
            self.server.stop()

    def conn_info(self) -> dict[str, Any]:
        return {"url": self.base_url}

    @classmethod
    def attach(cls, info: dict[str, Any]) -> CelerySystem:
        os.environ["BENCH_CELERY_URL"] = info["url"]
        _tasks()
        self = cls()
        self.base_url = info["url"]
        return self

    def detach(self) -> None:
        pass

    # -- workloads ------------------------------------------------------------------
    def _get(self, result: Any, timeout: float, **kwargs: Any) -> Any:
        """``result.get``; a group's join polls every 10 ms (Celery's default: 500 ms)."""
        from celery.exceptions import TimeoutError as CeleryTimeout

        try:
            return result.get(timeout=timeout, interval=0.01, **kwargs)
        except CeleryTimeout:
            state = ""
            if hasattr(result, "backend") and not hasattr(result, "results"):
                meta = result.backend.get_task_meta(result.id, cache=False)
                state = f" (the backend says the task is {meta.get('status')})"
            raise DidNotComplete(f"no result within {timeout:.0f}s{state}") from None

    def fan_out(self, salt: str, n: int, timeout: float) -> list[int]:
        from celery import group

        ct = _tasks()
        return self._get(group(ct.noop.s(salt, i) for i in range(n)).apply_async(), timeout)

    def ping(self, salt: str, i: int, timeout: float) -> int:
        return self._get(_tasks().noop.delay(salt, i), timeout)

    def tree(self, salt: str, depth: int, timeout: float) -> int:
        return self._get(_tasks().tree.delay(salt, depth, 0), timeout)

    def shared(
        self, salt: str, n: int, copies: int, seconds: float, log: str, timeout: float
    ) -> dict[str, Any]:
        # No memoization and no waiting inside tasks: the client runs the lattice level
        # by level (anti-diagonals), passing each node its children's values.
        from celery import group

        ct = _tasks()
        deadline = time.monotonic() + timeout
        slow = group(ct.slow.s(salt, seconds, log) for _ in range(copies)).apply_async()
        levels: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for i, j in tasks_common.paths_nodes(n):
            levels[i + j].append((i, j))
        values: dict[tuple[int, int], int] = {}
        for level in sorted(levels):
            nodes = levels[level]
            sigs = [
                ct.paths_leaf.s(salt, i, j, log)
                if i == 0 or j == 0
                else ct.paths_node.s(salt, i, j, log, values[i - 1, j], values[i, j - 1])
                for i, j in nodes
            ]
            got = self._get(group(sigs).apply_async(), max(0.1, deadline - time.monotonic()))
            values.update(zip(nodes, got, strict=True))
        slow_values = self._get(slow, max(0.1, deadline - time.monotonic()))
        return {"paths": values[n, n], "slow": slow_values}

    def skew(self, salt: str, durations: list[float], timeout: float) -> int:
        return self._get(_tasks().skew_parent.delay(salt, durations), timeout)

    def naps(self, salt: str, n: int, seconds: float, timeout: float) -> list[Any]:
        from celery import group

        ct = _tasks()
        result = group(ct.nap.s(salt, i, seconds) for i in range(n)).apply_async()
        return self._get(result, timeout, propagate=False)

    def victim(self) -> int:
        pool = self._pool()
        if not pool:
            raise DidNotComplete("no celery pool process to kill")
        return pool[0].pid

    def blobs(self, salt: str, n: int, size: int, timeout: float) -> list[bytes]:
        from celery import group

        ct = _tasks()
        self._last_blobs = group(ct.blob.s(salt, i, size) for i in range(n)).apply_async()
        try:
            return self._get(self._last_blobs, timeout)
        except DidNotComplete as exc:
            raise DidNotComplete(f"{exc}; {self._why_missing(self._last_blobs)}") from None

    def _why_missing(self, result: Any) -> str:
        """Were the results stored (and only the client's wake-ups lost)?"""
        import redis

        ready = sum(1 for r in result.results if r.ready())
        client = redis.Redis.from_url(self.valkey_url or "")
        try:
            dropped = client.info("stats").get("client_output_buffer_limit_disconnections", 0)
        finally:
            client.close()
        return (
            f"{ready}/{len(result.results)} results were stored in the backend; Valkey "
            f"disconnected {dropped} client(s) over client-output-buffer-limit (the result "
            "subscriber gets every result through pub/sub; default limit pubsub 32mb)"
        )

    def release_blobs(self, salt: str, n: int, size: int) -> dict[str, Any]:
        if self._last_blobs is not None:
            self._last_blobs.forget()  # results live in the backend for result_expires
            self._last_blobs = None
        return {}

    def extras(self) -> dict[str, Any]:
        """Valkey memory per queued message (10,000 sent to a queue nobody consumes)."""
        import redis

        ct = _tasks()
        n = 10_000
        before = harness.used_memory(self.valkey_url or "")
        for i in range(n):
            ct.noop.apply_async(("queued", i), queue="bench-parked")
        after = harness.used_memory(self.valkey_url or "")
        client = redis.Redis.from_url(self.valkey_url or "")
        try:
            queued = client.llen("bench-parked")
            client.delete("bench-parked")
        finally:
            client.close()
        return {"queued_calls": queued, "bytes_per_queued_call": round((after - before) / n)}
