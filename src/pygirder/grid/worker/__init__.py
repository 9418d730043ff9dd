"""The worker process: ``run_worker`` runs one in this process until a signal.

The modules of this package, one concept each:

- ``loop``: the execution loop (take, run under the baton, park, hand back);
  :class:`Worker` is this loop plus the collaborators below.
- ``options``: :class:`WorkerOptions`, what a worker is told at start.
- ``baton``: the baton and the threads sync calls run in.
- ``functions``: the function a request names, imported as ``grid.loading`` allows.
- ``results``: storing results in batches so that none is dropped.
- ``sharing``: offering the oldest local work to idle workers of the pool.
- ``cycle_checks``: the rationed cycle searches of parked requests.
- ``recovery``: reaping dead workers, requeues, poison, hand-back after a crash.
- ``watchdog``: ``max_runtime`` and :func:`reexec`.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from ...errors import ConfigError
from .baton import Baton, Threads
from .cycle_checks import Parked
from .loop import HandedBack, Worker
from .options import WorkerOptions
from .watchdog import reexec

__all__ = [
    "Baton",
    "HandedBack",
    "Parked",
    "Threads",
    "Worker",
    "WorkerOptions",
    "reexec",
    "run_worker",
]


def run_worker(
    url: str,
    *,
    pool: str = "default",
    namespace: str = "default",
    imports: tuple[str, ...] = (),
    auto_import: bool = False,
    main_path: str | None = None,
    allow_modules: tuple[str, ...] = (),
    worker_id: str | None = None,
    result_ttl: int = 0,
    log_level: str | None = "INFO",
    max_runtime: float | None = None,
) -> dict[str, Any]:
    """Run one worker in this process until SIGTERM/SIGINT; returns what it did.

    With a ``log_level``, the process's log records at that level and above (the user
    code's included, tagged with the request they ran for) also go to the grid's log
    stream, where `pygirder logs` reads them.  ``max_runtime`` is the default limit
    of a call's computing time (None: ``PYGIRDER_MAX_RUNTIME``; 0: none); a call over
    its limit fails and the process re-executes itself.
    """
    if result_ttl < 0:
        raise ConfigError(f"--result-ttl {result_ttl}: must be 0 (keep) or a number of seconds")
    options = WorkerOptions(
        pool=pool, namespace=namespace, imports=imports, auto_import=auto_import,
        allow_modules=allow_modules, main_path=main_path, worker_id=worker_id,
        result_ttl=result_ttl, max_runtime=max_runtime,
    )  # fmt: skip
    worker = Worker(url, options)

    handler = None
    if log_level:
        from ...observe.logs import install_grid_logging

        handler = install_grid_logging(url, namespace, log_level, process_id=worker.id)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        await worker.run()

    try:
        asyncio.run(main())
    finally:
        if handler is not None:
            handler.close()
    return {"id": worker.id, "pool": pool, "processed": worker.processed}
