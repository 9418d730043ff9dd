"""The init of a simulated instance: run its boot, keep its process tree, end it on SIGTERM.

The local data plane (:mod:`pygirder.cloud.sim.simulator`) starts one per instance::

    python -I -S .../pygirder/cloud/siminit.py --grace 10 -- /bin/bash .../pygirder-boot

It is run by path with the standard library only (no ``pygirder`` import, no site
packages), because a rehearsal runs dozens of instances and each has one: it costs a
few MB and wakes up once a second.  What it does, as systemd does for
``pygirder-boot.service``:

- it becomes a *child subreaper* (Linux ``prctl``), so every process of the
  instance, even one that starts its own session and loses its parent, stays in
  its tree and is reaped here;
- it runs the command with no signal blocked and waits; it exits when no process of
  the instance is left, with the command's status (128 + N if signal N ended it);
- on SIGTERM or SIGINT, or when the simulator that started it dies, every
  descendant gets SIGTERM at once (``KillMode=control-group``) and SIGKILL
  ``--grace`` seconds later.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Sequence

# PR_SET_CHILD_SUBREAPER from <linux/prctl.h>.
_PR_SET_CHILD_SUBREAPER = 36
_WATCHED = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
# Python ignores these; the instance's processes must get the defaults (as Popen restores).
_DEFAULTED = {signal.SIGPIPE, signal.SIGXFSZ}


def become_subreaper() -> bool:
    """Orphans of this process's descendants come back to it instead of pid 1."""
    if not sys.platform.startswith("linux"):
        return False
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    return False


def descendants(pid: int) -> list[int]:
    """Every descendant of ``pid``, from /proc (empty where there is no /proc)."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(children.get(child, []))
    return out


def signal_tree(sig: int) -> None:
    """Send ``sig`` to every descendant of this process."""
    for pid in descendants(os.getpid()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def run(command: Sequence[str], grace: float) -> int:
    """Run ``command`` as the instance's first process; see the module docstring."""
    become_subreaper()
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
    child = os.posix_spawnp(
        command[0], list(command), os.environ, setsigmask=(), setsigdef=_DEFAULTED
    )
    status: int | None = None
    deadline: float | None = None
    while True:
        while True:  # reap whatever has ended
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return 0 if status is None else status
            if pid == 0:
                break
            if pid == child:
                code = os.waitstatus_to_exitcode(wait_status)
                status = 128 - code if code < 0 else code
        ending = deadline is not None
        if not ending and os.getppid() != parent:  # the simulator died
            deadline = time.monotonic() + grace
            signal_tree(signal.SIGTERM)
        elif deadline is not None and time.monotonic() >= deadline:
            signal_tree(signal.SIGKILL)
            deadline = time.monotonic() + 1.0
        wait = 1.0 if deadline is None else max(0.05, min(1.0, deadline - time.monotonic()))
        got = signal.sigtimedwait(_WATCHED, wait)
        if got is not None and got.si_signo != signal.SIGCHLD and deadline is None:
            deadline = time.monotonic() + grace
            signal_tree(signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="siminit.py", description=__doc__.splitlines()[0])
    parser.add_argument("--grace", type=float, default=10.0, help="SIGTERM to SIGKILL, seconds")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    return run(command, args.grace)


if __name__ == "__main__":
    sys.exit(main())
