"""B5's fresh client: attach to a running system from a new process and rerun B4.

Usage (from ``workloads.b5``): ``python fresh_client.py '<json spec>'`` where the spec
names the system, how to reach it (``conn``) and the B4 run to repeat (salt, log, n,
copies, seconds).  Prints one JSON line: ``time_s`` is from the first call to the
last result, ``connect_s`` the time to attach before that.
"""

from __future__ import annotations

import json
import sys
import time

import tasks_common as common
from harness import DidNotComplete


def main(spec: dict) -> dict:
    from systems import attach

    started = time.perf_counter()
    system = attach(spec["system"], spec["conn"])
    connected = time.perf_counter()
    try:
        out = system.shared(
            spec["salt"], spec["n"], spec["copies"], spec["seconds"], spec["log"], spec["timeout"]
        )
    except DidNotComplete as exc:
        return {"status": "did not complete", "reason": str(exc)}
    finally:
        done = time.perf_counter()
        system.detach()
    correct = out["paths"] == common.paths_value(spec["n"]) and out["slow"] == [1] * spec["copies"]
    return {
        "status": "ok",
        "connect_s": round(connected - started, 4),
        "time_s": round(done - connected, 4),
        "correct": correct,
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
