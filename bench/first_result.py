"""B0's fresh process: start a system from nothing and wait for its first result.

Usage (from ``workloads.b0``): ``python first_result.py SYSTEM TIMEOUT``.  The system's
framework is imported first, untimed (a program imports it before it connects); then
``start()`` (pygirder: a private Valkey, two worker processes and a client, as
``pygirder.connect()`` does) and one call.  Prints one JSON line: ``first_s`` from the
start to the first result, ``start_s`` the start alone.
"""

from __future__ import annotations

import json
import sys
import time

import harness
import systems
from harness import DidNotComplete


def main(name: str, timeout: float) -> dict:
    system = systems.create(name)  # imports the framework
    started = time.perf_counter()
    try:
        system.start()
        ready = time.perf_counter()
        value = system.ping(harness.new_salt(), 7, timeout)
        done = time.perf_counter()
    except DidNotComplete as exc:
        return {"status": "did not complete", "reason": str(exc)}
    finally:
        system.stop()
    return {
        "status": "ok",
        "first_s": round(done - started, 4),
        "start_s": round(ready - started, 4),
        "correct": value == 7,
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], float(sys.argv[2]))), flush=True)
    sys.stdout.flush()
