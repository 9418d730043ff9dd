"""The local supervisor restarts a dead worker process at once, and one that keeps
crashing with growing pauses: a killed worker is replaced before its share of the work
piles up, and a poison import does not spin a core."""

from __future__ import annotations

import sys
import time

from pygirder.grid.supervisor import Supervisor


def _reap(supervisor: Supervisor) -> float:
    """Wait for the child to exit and let the supervisor see it: seconds until the
    replacement may start."""
    child = supervisor.children[0]
    assert child is not None
    child.wait(30)
    supervisor.poll()
    assert supervisor.children[0] is None
    return supervisor.next_start[0] - time.monotonic()


def test_a_crashing_child_restarts_at_once_then_with_growing_pauses():
    supervisor = Supervisor([sys.executable, "-c", "raise SystemExit(3)"], 1, max_backoff=1.0)
    supervisor.start()
    try:
        assert _reap(supervisor) <= 0  # the first failure: no pause
        supervisor.poll()
        assert supervisor.children[0] is not None  # replaced at the next poll
        pause = _reap(supervisor)  # the second failure in a row
        assert 0.3 < pause <= 0.5
        supervisor.poll()
        assert supervisor.children[0] is None  # still pausing
        time.sleep(pause + 0.05)
        supervisor.poll()
        assert supervisor.children[0] is not None
        assert 0.8 < _reap(supervisor) <= 1.0  # the third: 1 s, the cap
        assert supervisor.restarts == 3
    finally:
        supervisor.stop(timeout=5)


def test_the_pause_grows_with_failures_in_a_row_and_is_capped():
    supervisor = Supervisor(["true"], 1, max_backoff=4.0)
    assert [supervisor.backoff(n) for n in range(1, 7)] == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0]
    assert supervisor.backoff(0) == 0.5  # a clean exit was meant: no hurry
