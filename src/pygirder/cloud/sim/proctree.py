"""Process trees on the simulator's host: who descends from an instance's init, how
to signal or kill all of it at once, and how much memory it holds.

psutil is used when installed, else ``/proc`` (Linux); without either a tree is just
its root.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Sequence
from pathlib import Path


def children_map() -> dict[int, list[int]]:
    """Parent pid -> child pids, from psutil or /proc."""
    tree: dict[int, list[int]] = {}
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        for proc in psutil.process_iter(["pid", "ppid"]):
            tree.setdefault(proc.info["ppid"] or 0, []).append(proc.info["pid"])
        return tree
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path("/proc", entry, "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pid: int, tree: dict[int, list[int]] | None = None) -> list[int]:
    tree = children_map() if tree is None else tree
    out: list[int] = []
    todo = list(tree.get(pid, []))
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(tree.get(child, []))
    return out


def signal_all(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def kill_tree(pid: int) -> None:
    """SIGKILL a process, its process group and all its descendants."""
    signal_all(descendants(pid), signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def tree_rss(pid: int, tree: dict[int, list[int]]) -> int | None:
    """Resident memory of ``pid``'s descendants (not the init itself), or None without psutil."""
    try:
        import psutil
    except ImportError:
        return None
    total = 0
    for child in descendants(pid, tree):
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(child).memory_info().rss
    return total
