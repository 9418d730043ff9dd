"""Child processes that die with their owner.

A private Valkey server or a local worker must not outlive the program that started
it: after a ``kill -9`` of the owner they would run on with parent 1, holding ports,
memory and possibly grid state.  On Linux every child is started with a parent-death
signal (``prctl(PR_SET_PDEATHSIG)``).  That signal fires when the *thread* that forked
the child exits, not the process, so children are forked by one daemon thread that
lives as long as the process, whichever thread asked for them.  Where the signal is
not available, Python children run :func:`watch_parent` as a fallback.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

__all__ = ["PARENT_ENV", "popen", "watch_parent"]

# Set in a child's environment to the pid of the process that must outlive it.
PARENT_ENV = "PYGIRDER_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()  # loaded before any fork: no dlopen in a forked child


def _die_with_parent(sig: int, parent: int) -> Callable[[], None]:
    def preexec() -> None:  # runs in the child between fork and exec
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the owner died before the signal was armed
            os._exit(1)

    return preexec


class _Forker:
    """One daemon thread that forks every child (see the module docstring)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, fn: Callable[[], Any]) -> Any:
        if threading.current_thread() is self._thread:
            return fn()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="pygirder-forker", daemon=True
                )
                self._thread.start()
        result: Future[Any] = Future()
        self._jobs.put((fn, result))
        return result.result()

    def _loop(self) -> None:
        while True:
            fn, result = self._jobs.get()
            try:
                result.set_result(fn())
            except BaseException as exc:
                result.set_exception(exc)


_forker = _Forker()


def popen(
    args: list[str], *, death_signal: int = signal.SIGTERM, **kwargs: Any
) -> subprocess.Popen[bytes]:
    """``subprocess.Popen`` of a child that gets ``death_signal`` when this process dies."""
    env = dict(kwargs.pop("env", None) or os.environ)
    env[PARENT_ENV] = str(os.getpid())
    preexec = _die_with_parent(death_signal, os.getpid())
    return _forker.run(lambda: subprocess.Popen(args, env=env, preexec_fn=preexec, **kwargs))


def watch_parent(on_orphaned: Callable[[], None], every: float = 1.0) -> threading.Thread | None:
    """Call ``on_orphaned`` once if the process named by ``PYGIRDER_PARENT_PID`` (the
    one that started this one) goes away; the fallback for the parent-death signal."""
    raw = os.environ.pop(PARENT_ENV, "")  # not passed on to our own children
    if not raw.isdigit() or int(raw) != os.getppid():
        return None  # not started by popen, or inherited from further up: not ours
    parent = int(raw)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        on_orphaned()

    thread = threading.Thread(target=watch, name="pygirder-parent-watch", daemon=True)
    thread.start()
    return thread
