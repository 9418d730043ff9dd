"""Run N worker processes on one machine: restart the ones that crash, forward signals.

``pygirder worker --processes N`` (or ``auto``: one per core) is this supervisor; each
child is a plain ``pygirder worker --processes 1``.  A child that dies is restarted at
once; one that keeps crashing, with exponential backoff, so a poison import cannot spin
the machine.
Children die with the supervisor (see :mod:`pygirder.lifetime`), even after a SIGKILL.
A child that dies is reported to ``on_death`` with its pid before its replacement starts:
the worker commands pass :class:`pygirder.grid.recovery.DeadChildRecovery`, which requeues
the dead worker's requests at once instead of after its heartbeat TTL.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO

from ..lifetime import popen

log = logging.getLogger("pygirder.supervisor")


def parse_processes(value: str) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        from ..errors import ConfigError

        raise ConfigError(f"--processes {value!r}: give a positive number or 'auto' (one per core)")
    return n


class Supervisor:
    """Keeps ``n`` copies of ``command`` running until told to stop.

    ``run()`` blocks and handles SIGTERM/SIGINT (the `pygirder worker` command);
    ``start()``/``poll()``/``stop()`` let an embedding program (``pygirder.connect()``'s
    local workers) drive it from a thread of its own.
    """

    def __init__(
        self,
        command: Sequence[str],
        n: int,
        *,
        max_backoff: float = 30.0,
        env: dict[str, str] | None = None,
        output: Callable[[int], IO[bytes] | None] | None = None,
        death_signal: int = signal.SIGTERM,
        on_death: Callable[[int], object] | None = None,
    ) -> None:
        self.command = list(command)
        self.on_death = on_death  # called with the pid of each child that exited
        self.n = n
        self.max_backoff = max_backoff
        self.env = env
        self.output = output
        self.death_signal = death_signal  # what a child gets if this process dies
        self.children: list[subprocess.Popen[bytes] | None] = [None] * n
        self.failures = [0] * n
        self.next_start = [0.0] * n
        self.restarts = 0
        self._stopping = False
        self._lock = threading.Lock()

    def _spawn(self, i: int) -> None:
        out = self.output(i) if self.output else None
        try:
            self.children[i] = popen(
                self.command, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT if out else None, env=self.env,
                death_signal=self.death_signal,
            )  # fmt: skip
        finally:
            if out is not None:
                out.close()

    def start(self) -> None:
        with self._lock:
            for i in range(self.n):
                self._spawn(i)

    def add(self, count: int = 1) -> None:
        """Run ``count`` more processes."""
        with self._lock:
            for _ in range(count):
                self.children.append(None)
                self.failures.append(0)
                self.next_start.append(0.0)
                self.n += 1
                self._spawn(self.n - 1)

    def poll(self) -> None:
        """Restart exited processes, with exponential backoff for repeat failures; report
        each exit to ``on_death`` first (the replacement starts at a later poll)."""
        exited = []
        with self._lock:
            if self._stopping:
                return
            now = time.monotonic()
            for i, child in enumerate(self.children):
                if child is None:
                    if now >= self.next_start[i]:
                        self._spawn(i)
                    continue
                code = child.poll()
                if code is None:
                    continue
                self.children[i] = None
                self.failures[i] = self.failures[i] + 1 if code != 0 else 0
                delay = self.backoff(self.failures[i])
                self.next_start[i] = now + delay
                self.restarts += 1
                exited.append(child.pid)
                when = f"in {delay:.1f}s" if delay else "now"
                log.warning("worker process %d exited with %s; restarting %s", i, code, when)
        if self.on_death is not None:
            for pid in exited:
                self.on_death(pid)

    def backoff(self, failures: int) -> float:
        """Seconds before a child that failed ``failures`` times in a row starts again
        (0: it exited cleanly).

        The first failure restarts it at once: a worker lost to the OOM killer or a
        stray SIGKILL is one machine's share of the work, and every second without it
        the others carry that share.  Repeats wait 0.5 s, 1 s, 2 s, ... up to
        ``max_backoff``: a crash at import costs a start a while, not a spinning core.
        A clean exit was meant, so there is no hurry: 0.5 s, which also keeps a child
        that always exits at once from spinning.
        """
        if failures == 1:
            return 0.0
        return float(min(self.max_backoff, 0.5 * 2 ** max(0, failures - 2)))

    def pids(self) -> list[int]:
        with self._lock:
            return [c.pid for c in self.children if c is not None and c.poll() is None]

    def stop(self, signum: int = signal.SIGTERM, timeout: float | None = None) -> int:
        """Signal every child, wait for them (kill after ``timeout``); 0 if all exited cleanly."""
        with self._lock:
            self._stopping = True
            children = [c for c in self.children if c is not None]
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)
        if timeout is None:
            return 0
        codes = []
        for child in children:
            try:
                codes.append(child.wait(timeout))
            except subprocess.TimeoutExpired:
                child.kill()
                codes.append(child.wait())
        return 0 if all(c in (0, -signal.SIGTERM, -signal.SIGINT) for c in codes) else 1

    def run(self, poll: float = 0.2) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda s, _f: self.stop(s))
        self.start()
        while not self._stopping:
            self.poll()
            time.sleep(poll)
        codes = [c.wait() for c in self.children if c is not None]
        return 0 if all(c in (0, -signal.SIGTERM, -signal.SIGINT) for c in codes) else 1


def child_command(argv: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "pygirder", *argv]
