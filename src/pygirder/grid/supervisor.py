"""Run N worker processes on one machine: restart the ones that crash, forward signals.

``pygirder worker --processes N`` (or ``auto``: one per core) is this supervisor; each
child is a plain ``pygirder worker --processes 1``.  A child that keeps crashing is
restarted with exponential backoff, so a poison import cannot spin the machine.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

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
    """Keeps ``n`` copies of ``command`` running until told to stop."""

    def __init__(self, command: Sequence[str], n: int, *, max_backoff: float = 30.0) -> None:
        self.command = list(command)
        self.n = n
        self.max_backoff = max_backoff
        self.children: list[subprocess.Popen[bytes] | None] = [None] * n
        self.failures = [0] * n
        self.next_start = [0.0] * n
        self.restarts = 0
        self._stopping = False

    def _spawn(self, i: int) -> None:
        self.children[i] = subprocess.Popen(self.command, stdin=subprocess.DEVNULL)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        self._stopping = True
        for child in self.children:
            if child is not None and child.poll() is None:
                child.send_signal(signum)

    def run(self, poll: float = 0.2) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda s, _f: self.stop(s))
        for i in range(self.n):
            self._spawn(i)
        while not self._stopping:
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
                delay = min(self.max_backoff, 0.5 * 2 ** max(0, self.failures[i] - 1))
                self.next_start[i] = now + delay
                self.restarts += 1
                log.warning("worker process %d exited with %s; restarting in %.1fs", i, code, delay)
            time.sleep(poll)
        codes = []
        for child in self.children:
            if child is not None:
                codes.append(child.wait())
        return 0 if all(c == 0 or c == -signal.SIGTERM for c in codes) else 1


def child_command(argv: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "pygirder", *argv]
