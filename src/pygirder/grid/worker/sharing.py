"""Sharing: offering the oldest entries of a worker's local stack to its pool.

Sub-calls go on the worker's own stack and run depth first; the entries nearest the
root are the biggest pieces of work, so those are what an idle worker of the pool
gets.  The server moves an offer only while some worker of the pool is idle.

Offers go out on a period that backs off while there is nothing to offer or nobody
takes it (an idle worker wakes a few times a second, not fifty), and at once on two
events: when a request about to park leaves a fan-out on an empty stack (its children
can start elsewhere right away: the worker offers them before the first one starts, so
no running call delays the offer), and when a worker of the pool goes idle while this
one's last offer found nobody idle (that worker's ``idle`` script sends this one a
message).  So a worker that runs dry is fed in a few round trips, not a period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from ...store import scripts
from ..runtime import Runtime

log = logging.getLogger("pygirder.worker")

# (request id, payload, careful): careful for suspects of an earlier worker death
StackEntry = tuple[str, bytes, bool]


class Sharing:
    """Moves surplus entries of one worker's ``stack`` to the queue of its pool."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        pool: str,
        worker_id: str,
        stack: list[StackEntry],
        wake: asyncio.Event,
        period: float,
        busy: Callable[[], bool] = lambda: False,
    ) -> None:
        self.runtime = runtime
        self.pool = pool
        self.worker_id = worker_id
        self.stack = stack  # the worker's own list, changed in place only
        self.wake = wake  # set when entries come back, for a scheduler gone idle
        self.period = period
        self.busy = busy  # a request holds the worker's baton: it pops nothing right now
        self._now = asyncio.Event()  # offer without waiting for the period (kick())
        self.offering: set[bytes] = set()  # ids off the stack while an offer is out

    def kick(self) -> None:
        """Offer surplus at once rather than at the end of the period."""
        self._now.set()

    def offerable(self) -> int:
        """Stack entries this worker can spare now: all of them while a request holds
        its baton (an idle peer can start one before this worker could), all but the
        top one otherwise (it is what this worker runs next)."""
        return len(self.stack) if self.busy() else len(self.stack) - 1

    async def run(self, processed: Callable[[], int]) -> None:
        """Offer surplus work to the pool: half of what this worker would not get
        through in one period, and at least the oldest entry.  The period backs off (up
        to 8x) while nothing is taken, and snaps back when an offer is taken; a kick
        (see the module) cuts any wait short.  A stack that grows from at most one
        entry is offered at once by ``Worker.gather``, so a backed-off period never
        delays the first offer of a fan-out."""
        last = processed()
        period = self.period
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._now.wait(), period)
            self._now.clear()
            done = processed()
            recent, last = done - last, done
            moved = await self.offer(recent)
            # back off while there is nothing to spare or nobody takes it: a worker with
            # an empty stack then wakes a few times a second, not fifty; the kicks above
            # are what make sharing prompt
            period = self.period if moved else min(2 * period, 8 * self.period)

    async def offer(self, recent: int = 0) -> int | None:
        """Offer half of the stack beyond the ``recent`` entries this worker gets through
        in a period; the number moved, or None with nothing to spare."""
        spare = self.offerable()
        if spare < 1:
            return None
        # Offer at least the oldest entry: in a depth-first stack it is the biggest piece
        # of work (nearest the root), so one entry can feed an idle worker for long; the
        # server moves offers only while some worker of the pool is idle.  At most a
        # chunk per offer (the server moves it in one script call); an idle worker takes
        # a fair share of it, and the next period offers more.
        offer = min(scripts.SHARE_CHUNK, max(1, (len(self.stack) - recent) // 2))
        return await self.share(min(offer, spare))

    async def share(self, count: int, *, force: bool = False) -> int:
        """Offer the ``count`` oldest stack entries to the pool (all of them if ``force``)."""
        candidates = self.stack[:count]
        del self.stack[:count]
        self.offering.update(rid.encode() for rid, _, _ in candidates)
        moved: set[bytes] = set()
        # forced, in chunks: one script call per chunk keeps the server free for everyone
        # else.  An offer (at most a chunk) is one call: the server weighs all of it
        # against the queue.
        step = scripts.SHARE_CHUNK if force else max(1, len(candidates))
        try:
            for start in range(0, len(candidates), step):
                reply = await scripts.share(
                    self.runtime, self.runtime.keys,
                    [rid for rid, _, _ in candidates[start : start + step]],
                    pool=self.pool, worker=self.worker_id, force=force,
                )  # fmt: skip
                moved.update(reply)
        except Exception as exc:
            log.warning("sharing failed: %s", exc)
        finally:
            kept = [item for item in candidates if item[0].encode() not in moved]
            self.stack[0:0] = kept
            self.offering.difference_update(rid.encode() for rid, _, _ in candidates)
            if kept:
                # the scheduler may have gone idle while these were out on offer
                self.wake.set()
        return len(moved)
