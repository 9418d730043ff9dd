"""Ray under benchmark: a local head node with 2 CPUs (two task worker processes).

Run in a process whose environment keeps Ray on loopback and out of ``~``:
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (without it Ray swaps 127.0.0.1 for the
machine's own address and listens on every interface), ``RAY_USAGE_STATS_ENABLED=0``,
and ``HOME``/``TMPDIR`` pointing at a throw-away folder; ``run.py`` sets all of them.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import harness
import psutil
import ray
import tasks_ray as tr
from harness import DidNotComplete
from ray.exceptions import GetTimeoutError


def _get(refs: Any, timeout: float) -> Any:
    try:
        return ray.get(refs, timeout=timeout)
    except GetTimeoutError:
        raise DidNotComplete(f"no result within {timeout:.0f}s") from None


class RaySystem(harness.System):
    name = "ray"

    def start(self) -> None:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=os.path.join(tempfile.gettempdir(), "ray"),
            log_to_driver=False,
        )

    def stop(self) -> None:
        ray.shutdown()

    def conn_info(self) -> dict[str, Any]:
        return {"address": ray.get_runtime_context().gcs_address}

    @classmethod
    def attach(cls, info: dict[str, Any]) -> RaySystem:
        ray.init(address=info["address"], log_to_driver=False)
        return cls()

    def detach(self) -> None:
        ray.shutdown()

    def fan_out(self, salt: str, n: int, timeout: float) -> list[int]:
        return _get([tr.noop.remote(salt, i) for i in range(n)], timeout)

    def ping(self, salt: str, i: int, timeout: float) -> int:
        return _get(tr.noop.remote(salt, i), timeout)

    def tree(self, salt: str, depth: int, timeout: float) -> int:
        return _get(tr.tree.remote(salt, depth, 0), timeout)

    def shared(
        self, salt: str, n: int, copies: int, seconds: float, log: str, timeout: float
    ) -> dict[str, Any]:
        # Ray has no memoization: the driver builds the lattice as a task graph with
        # its own memo dict (one task per (i, j), children passed as object refs).
        # Re-entrant recursion without it would make 2 * C(2n, n) - 1 calls.
        slow = [tr.slow.remote(salt, seconds, log) for _ in range(copies)]
        refs: dict[tuple[int, int], Any] = {}
        for i, j in _lattice(n):
            if i == 0 or j == 0:
                refs[i, j] = tr.paths_leaf.remote(salt, i, j, log)
            else:
                refs[i, j] = tr.paths_node.remote(salt, i, j, log, refs[i - 1, j], refs[i, j - 1])
        values = _get([refs[n, n], *slow], timeout)
        return {"paths": values[0], "slow": values[1:]}

    def skew(self, salt: str, durations: list[float], timeout: float) -> int:
        return _get(tr.skew_parent.remote(salt, durations), timeout)

    def naps(self, salt: str, n: int, seconds: float, timeout: float) -> list[Any]:
        refs = [tr.nap.remote(salt, i, seconds) for i in range(n)]
        try:
            return _get(refs, timeout)
        except ray.exceptions.RayError:
            out = []
            for ref in refs:
                try:
                    out.append(ray.get(ref, timeout=timeout))
                except ray.exceptions.RayError as exc:
                    out.append(exc)
            return out

    def victim(self) -> int:
        """A worker process whose title says it runs a nap task (``ray::nap``)."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for proc in harness.process_tree(os.getpid()):
                try:
                    cmd = proc.cmdline()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                if cmd and cmd[0].startswith("ray::nap"):
                    return proc.pid
            time.sleep(0.01)
        raise DidNotComplete("no Ray worker process was running a nap task to kill")

    def blobs(self, salt: str, n: int, size: int, timeout: float) -> list[bytes]:
        return _get([tr.blob.remote(salt, i, size) for i in range(n)], timeout)


def _lattice(n: int) -> list[tuple[int, int]]:
    import tasks_common

    return tasks_common.paths_nodes(n)
