"""Celery app and tasks of the benchmarks (the same work as ``tasks_pygirder``).

The broker and the result backend are both the private Valkey the harness starts
(``BENCH_CELERY_URL``, db 0 for the broker, db 1 for results).  Workers run as
``celery -A tasks_celery worker --concurrency 2 --prefetch-multiplier 1 -O fair`` with
late acknowledgement, the configuration Celery's documentation recommends for long
tasks.  Celery has no memoization and tasks must not block on other tasks (it raises
``RuntimeError`` unless ``allow_join_result`` is used), so nested waits are written
the way Celery's docs allow: ``self.replace`` with a chord for B6, and a blocking
join under ``allow_join_result`` for B3 to see what happens.
"""

from __future__ import annotations

import os
import time

import tasks_common as common
from celery import Celery, chord, group
from celery.result import allow_join_result

_url = os.environ.get("BENCH_CELERY_URL", "redis://127.0.0.1:6379")
app = Celery("tasks_celery", broker=f"{_url}/0", backend=f"{_url}/1")
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=3600,
)


@app.task
def noop(salt: str, i: int) -> int:
    return i


@app.task(bind=True)
def tree(self, salt: str, depth: int, k: int) -> int:
    """B3: a blocking join inside a task (Celery forbids it unless explicitly allowed)."""
    if depth == 0:
        return 1
    kids = group(tree.s(salt, depth - 1, 2 * k), tree.s(salt, depth - 1, 2 * k + 1))
    with allow_join_result():
        a, b = kids.apply_async().get(disable_sync_subtasks=False)
    return a + b + 1


@app.task
def paths_node(salt: str, i: int, j: int, log: str, a: int, b: int) -> int:
    common.record(log, f"paths:{i}:{j}")
    return a + b


@app.task
def paths_leaf(salt: str, i: int, j: int, log: str) -> int:
    common.record(log, f"paths:{i}:{j}")
    return 1


@app.task
def slow(salt: str, seconds: float, log: str) -> int:
    common.record(log, "slow")
    time.sleep(seconds)
    return 1


@app.task
def burn(salt: str, k: int, seconds: float) -> int:
    common.burn(seconds)
    return k


@app.task
def total(values: list[int]) -> int:
    return sum(values)


@app.task(bind=True)
def skew_parent(self, salt: str, durations: list[float]) -> int:
    """B6: the parent replaces itself with a chord of its children (no blocking wait)."""
    kids = group(burn.s(salt, k, d) for k, d in enumerate(durations))
    raise self.replace(chord(kids, total.s()))


@app.task
def nap(salt: str, i: int, seconds: float) -> int:
    time.sleep(seconds)
    return 2 * i


@app.task
def blob(salt: str, i: int, size: int) -> bytes:
    return common.payload(i, size)
