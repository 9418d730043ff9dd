"""Write-behind to the durable store: results are stored from a thread, in batches.

The worker hands each completed result here and goes on; a thread of its own writes
them in batches (one index transaction per batch on a folder, concurrent puts on
S3), so storing durably never sits on the path from a result to its waiters.  What
was stored is reported through ``on_stored`` (the worker then lets the hot tier
expire those results).  ``flush`` waits until everything handed over so far is
stored: the worker calls it on shutdown, so a clean stop loses nothing.  A write
that fails is logged and dropped: the result stays in Valkey (never expired there,
since it was not reported as stored) and is merely not durable.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from .base import Item, ResultStore

log = logging.getLogger("pygirder.results")

__all__ = ["WriteBehind"]

BATCH = 256
LINGER_S = 0.05


class WriteBehind:
    """A queue of results and the thread that stores them.

    ``max_pending_bytes`` bounds what waits in memory: :meth:`wait_room` blocks its
    caller (the worker, from a thread) while more is pending, so a slow store slows
    the worker instead of filling its memory.
    """

    def __init__(
        self,
        store: ResultStore,
        *,
        on_stored: Callable[[list[str]], None] | None = None,
        max_pending_bytes: int = 256 * 1024**2,
    ) -> None:
        self.store = store
        self.on_stored = on_stored
        self.max_pending_bytes = max_pending_bytes
        self._cond = threading.Condition()
        self._queue: list[Item] = []
        self._pending_bytes = 0
        self._busy = False
        self._closed = False
        self._flushing = 0  # callers of flush(): no lingering while they wait
        self.stored = 0  # results written (or found already stored)
        self.failed = 0  # results that could not be written
        self.seconds = 0.0  # time spent writing
        self._last_warning = 0.0
        self._thread = threading.Thread(target=self._run, name="pygirder-store", daemon=True)
        self._thread.start()

    def offer(self, items: Sequence[Item]) -> None:
        """Queue results for storing; never blocks."""
        if not items:
            return
        with self._cond:
            if self._closed:
                raise RuntimeError("the durable store writer is closed")
            self._queue.extend(items)
            self._pending_bytes += sum(len(i.body) for i in items)
            # the thread looks every LINGER_S on its own: waking it from the producer
            # (the worker's event loop) costs that thread a context switch per offer
            if len(self._queue) >= BATCH:
                self._cond.notify_all()

    def wait_room(self, timeout: float = 60.0) -> bool:
        """Block while more than ``max_pending_bytes`` wait; False if it timed out."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._pending_bytes <= self.max_pending_bytes or self._closed, timeout
            )

    @property
    def pending_bytes(self) -> int:
        with self._cond:
            return self._pending_bytes

    @property
    def behind(self) -> bool:
        """More is waiting than ``max_pending_bytes``: the producer should wait_room().
        Read without the lock (once per result): an int read is atomic, and a stale
        answer only waits or not one result later."""
        return self._pending_bytes > self.max_pending_bytes

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + (1 if self._busy else 0)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything offered so far is stored (or failed); False on time-out."""
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)
            finally:
                self._flushing -= 1

    def close(self, timeout: float | None = 30.0) -> bool:
        """Store what is queued (up to ``timeout``), then stop the thread."""
        done = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(1.0)
        if not done:
            with self._cond:
                left = len(self._queue)
            log.warning("result store %s: %d results were not stored durably before the "
                        "writer stopped", self.store.url, left)  # fmt: skip
        return done

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait(LINGER_S)  # offers do not wake it (see offer)
                if not self._queue:
                    return
                # let a batch gather for a moment: one index transaction (and one round
                # trip for the TTLs) per batch, not per result, and less lock contention
                # between the processes sharing a folder
                self._cond.wait_for(
                    lambda: len(self._queue) >= BATCH or self._closed or self._flushing,
                    LINGER_S,
                )
                batch, self._queue = self._queue[:BATCH], self._queue[BATCH:]
                self._busy = True
            started = time.perf_counter()
            stored: list[str] = []
            try:
                self.store.put_many(batch)
                stored = [i.id for i in batch]
                self.stored += len(batch)
            except Exception as exc:
                self.failed += len(batch)
                now = time.monotonic()
                level = logging.WARNING if now - self._last_warning > 30 else logging.DEBUG
                self._last_warning = now if level == logging.WARNING else self._last_warning
                log.log(level, "result store %s: could not store %d results (%s: %s); they "
                        "stay in the grid's server only", self.store.url, len(batch),
                        type(exc).__name__, exc)  # fmt: skip
            self.seconds += time.perf_counter() - started
            if stored and self.on_stored is not None:
                try:
                    self.on_stored(stored)
                except Exception as exc:
                    log.debug("after storing %d results: %s", len(stored), exc)
            with self._cond:
                self._busy = False
                self._pending_bytes -= sum(len(i.body) for i in batch)
                self._cond.notify_all()
