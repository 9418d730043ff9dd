"""The simulator's state directory: its lock, atomic writes, and the requests another
process (``pygirder cloud simulate interrupt``) posts to a running simulator.

A request is ``control/<name>.request.json``; the simulator answers it in
``control/<name>.answer.json`` on its next poll and removes the request.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...errors import PygirderError
from . import SimulatorError

DEFAULT_STATE_DIR = Path("~/.pygirder/simulate")
LOCK_FILE = "simulator.lock"


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` whole, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def lock_state_dir(directory: Path) -> Any:
    """Hold ``simulator.lock`` of ``directory`` (one simulator per state directory)."""
    import fcntl

    path = directory / LOCK_FILE
    handle = open(path, "a+")  # noqa: SIM115 - held for the simulator's lifetime
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise SimulatorError(
            f"another simulator is running on {path.parent}: stop it, or give this one "
            "its own --state-dir"
        ) from None
    return handle


def is_locked(path: Path) -> bool:
    """Whether a running simulator holds the lock file ``path``."""
    import fcntl

    if not path.exists():
        return False
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def request_interrupt(
    instance_id: str,
    state_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR,
    *,
    action: str = "terminate",
    in_seconds: float = 120.0,
    reclaim: bool = True,
    timeout: float = 10.0,
) -> str:
    """Ask the simulator running on ``state_dir`` to interrupt an instance; returns the time."""
    directory = Path(state_dir).expanduser()
    control = directory / "control"
    if not control.is_dir() or not is_locked(directory / LOCK_FILE):
        raise SimulatorError(
            f"no simulator is running on {directory}: start one with "
            "`pygirder cloud simulate --endpoint URL` (and the same --state-dir)"
        )
    name = f"{int(time.time() * 1000)}-{uuid.uuid4().hex[:8]}"
    body = {
        "op": "interrupt", "instance_id": instance_id, "action": action,
        "in_seconds": in_seconds, "reclaim": reclaim,
    }  # fmt: skip
    write_atomic(control / f"{name}.request.json", json.dumps(body))
    answer_path = control / f"{name}.answer.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answer_path.exists():
            answer = json.loads(answer_path.read_text())
            answer_path.unlink(missing_ok=True)
            if not answer.get("ok"):
                raise SimulatorError(str(answer.get("error")))
            return str(answer["time"])
        time.sleep(0.1)
    (control / f"{name}.request.json").unlink(missing_ok=True)
    raise SimulatorError(f"the simulator on {directory} did not answer within {timeout:g}s")


def serve_requests(control: Path, interrupt: Callable[..., str]) -> None:
    """Answer every request waiting in ``control`` (a running simulator's side)."""
    for request in sorted(control.glob("*.request.json")):
        answer: dict[str, Any]
        try:
            body = json.loads(request.read_text())
            if body.get("op") != "interrupt":
                raise SimulatorError(f"unknown request {body.get('op')!r}")
            stamp = interrupt(
                str(body["instance_id"]),
                action=str(body.get("action", "terminate")),
                in_seconds=float(body.get("in_seconds", 120.0)),
                reclaim=bool(body.get("reclaim", True)),
            )
            answer = {"ok": True, "time": stamp}
        except (PygirderError, ValueError, KeyError, OSError) as exc:
            answer = {"ok": False, "error": str(exc)}
        name = request.name.removesuffix(".request.json")
        write_atomic(control / f"{name}.answer.json", json.dumps(answer))
        request.unlink(missing_ok=True)
