"""What a worker is told at start: its pool, its code, its limits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerOptions:
    """How one worker runs; the defaults are those of `pygirder worker`."""

    pool: str = "default"
    namespace: str = "default"
    worker_id: str | None = None  # None: a fresh process id
    imports: tuple[str, ...] = ()  # modules imported at start (--import)
    auto_import: bool = False  # import any module a request names (--auto-import)
    main_path: str | None = None  # the caller's script, loaded on first use
    allow_modules: tuple[str, ...] = ()  # further modules a request may make it import
    share_period: float = 0.02  # seconds between offers of surplus work to the pool
    take_batch: int = 16  # requests taken from the pool queue at once
    result_ttl: int = 0  # seconds a result is kept (0: until collected)
    error_ttl: int = 300  # seconds an error is kept
    max_result_bytes: int | None = None  # None: PYGIRDER_MAX_RESULT_BYTES
    shutdown_grace: float = 30.0  # seconds running calls get to finish on stop()
    max_stack: int = 100_000  # local stack entries beyond which it shares at once
    max_runtime: float | None = None  # None: PYGIRDER_MAX_RUNTIME; 0: no limit
    restart: Callable[[], None] | None = None  # replaces the process (None: reexec)
