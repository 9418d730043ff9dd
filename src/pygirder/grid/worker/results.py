"""Storing results: finished calls go to the server in batches, and none is dropped.

A request whose result is lost would stay `running` under a live worker, where no
reaper helps; so a batch that fails is retried, split, replaced by a small error
that says why, and as a last resort handed back to its queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from redis import exceptions as redis_errors

from ... import settings
from ...errors import CallLink, GridOutOfMemory, RemoteError
from ...store import scripts
from ...store.scripts import Completion
from .. import bulk
from ..protocol import ERR, BytesEnvelope, Envelope, compress, compressing, encode_error
from ..runtime import Runtime

log = logging.getLogger("pygirder.worker")

# Results per `complete` call: one call stays short however many finished at once.
BATCH = 64
# ... and about this many bytes of them: the server holds a call's arguments in memory
# while it runs, and counts them against its maxmemory
BATCH_BYTES = 4 * 1024**2
# A result that finishes while more local work is ready waits at most this long (or
# for a full batch, or for the work to run out) before it is sent.
GATHER_S = 0.005
# Results larger than this go to the server as a SET of their own, not as an argument
# of the `complete` script.
OUTSIDE_BYTES = 64 * 1024


def _transient(exc: BaseException | None) -> bool:
    """An error that says "later", not "never" (the server unreachable, busy, loading)."""
    if isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError | OSError):
        return True
    return str(exc).startswith(("BUSY", "LOADING", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN"))


class Results:
    """The results of one worker on their way to the server."""

    def __init__(self, runtime: Runtime, *, worker_id: str, error_ttl: int) -> None:
        self.runtime = runtime
        self.worker_id = worker_id
        self.error_ttl = error_ttl
        self.retries = settings.store_retries()
        self.compress = compressing(runtime.url)  # large results, on a network
        self._pending: list[Completion] = []
        self._names: dict[str, str] = {}  # request -> function, while its result is stored
        self._transient_rounds = 0  # flushes in a row that failed with a transient error
        self._flusher: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None  # a deferred send (``more``)
        self._more = False  # the last result came with more local work ready
        self._restored: set[str] = set()  # answered from the durable store, not executed
        self._uncounted = 0  # restored results not yet moved from executed to restored
        # called with the ids of each batch the server has stored (the durable tier)
        self.on_completed: list[Callable[[list[str]], None]] = []
        # frees at least the given bytes of the server's memory, returns what it freed
        # (the durable tier drops results the store holds); None: nothing to free
        self.make_room: Callable[[int], Awaitable[int]] | None = None
        self._idle_pool: str | None = None  # the next completion marks the worker idle
        self._marking: asyncio.Task[None] | None = None  # the send that carries it

    def mark_idle(self, pool: str) -> bool:
        """Let the next completion sent mark the worker idle in ``pool`` (taking
        hand-offs), saving it a take of its own.  False when no completion is waiting
        to be sent: the worker must mark itself."""
        if not self._pending or self._flusher is None or self._flusher.done():
            return False
        self._idle_pool = pool
        self._marking = self._flusher
        return True

    async def idle_mark_sent(self) -> None:
        """Wait until a mark given to :meth:`mark_idle` has reached the server (or its
        send failed), so a later change of the mark is not overtaken by it."""
        marking, self._marking = self._marking, None
        if marking is not None and not marking.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(marking)

    def add(
        self,
        request_id: str,
        name: str,
        envelope: Envelope,
        ttl: int,
        started: float,
        summary: str,
        *,
        restored: bool = False,
        more: bool = False,
    ) -> None:
        """Queue a result; a send starts at once unless one is in flight.

        ``more``: further local work is ready to run, so the send waits (up to
        ``GATHER_S``, or a full batch) for its results to go in the same round trip.
        """
        self._names[request_id] = name
        if restored:
            self._restored.add(request_id)
        self._pending.append(Completion(request_id, envelope, ttl, started, summary))
        self._more = more
        if self._flusher is not None and not self._flusher.done():
            return  # the send in flight takes this one next
        if more and len(self._pending) < BATCH:
            self._send_later()
        else:
            self._send()

    def send_now(self) -> None:
        """The worker ran out of work: send what waits at once, without the gathering
        delay (a send in flight takes it next)."""
        if self._pending:
            self._more = False
            self._send()

    def _send_later(self) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(GATHER_S, self._send)

    def _send(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.create_task(self.flush(gather=True))

    def storing(self) -> set[str]:
        """The requests whose results are on their way to the server."""
        return set(self._names)

    async def drain(self) -> None:
        """Wait for the send in flight (and what queued behind it) to finish."""
        self._more = False
        self._send()
        if self._flusher is not None:
            await self._flusher
        if self._uncounted:
            await self._count_restored([])

    async def flush(self, *, gather: bool = False) -> None:
        """Send finished results, batching those that finish while a send is in flight.

        Under load this turns one round trip per call into one per batch; when calls
        are rare each still goes out at once.  ``gather``: stop early while more local
        work is ready and less than a batch is pending (``add``'s ``more``).
        """
        sent = False
        while self._pending:
            if gather and sent and self._more and len(self._pending) < BATCH:
                self._send_later()
                return
            sent = True
            end, size = 0, 0
            while end < min(len(self._pending), BATCH) and (not end or size < BATCH_BYTES):
                size += len(self._pending[end].result)
                end += 1
            batch = self._pending[:end]
            del self._pending[:end]
            await self._store(batch)

    async def _store(self, batch: list[Completion]) -> None:
        """Store a batch of results so that none is dropped.

        A failing batch is retried with backoff (a BUSY server, a lost connection), then
        split in halves (a batch over the server's limits); a result that still cannot
        be stored (out of memory) is replaced by a small error that says why; when even
        that fails the request is handed back to its queue.  With the server unreachable
        throughout, the batch stays pending and is tried again.
        """
        try:
            await self._complete(batch, retries=self.retries)
            self._transient_rounds = 0
            return
        except Exception as exc:
            error = exc
        # Out of memory: results the durable store holds may leave the server for these.
        while isinstance(error, GridOutOfMemory) and self.make_room is not None:
            if not await self.make_room(sum(len(done.result) for done in batch)):
                break
            try:
                await self._complete(batch, retries=1)
                return
            except Exception as exc:
                error = exc
        # The server busy or away: keep the results and try later, for a while (a
        # timeout can also come from the batch itself, such as a huge result).
        if _transient(error) and self._transient_rounds < 10:
            self._transient_rounds += 1
            log.error("could not store %d results (%s); retrying", len(batch), error)
            self._pending[0:0] = batch
            await asyncio.sleep(1.0)
            return
        self._transient_rounds = 0
        if len(batch) > 1:
            half = len(batch) // 2
            for part in (batch[:half], batch[half:]):
                try:
                    await self._complete(part, retries=1)
                except Exception:
                    await self._store_each(part)
            return
        await self._store_each(batch, error)

    async def _store_each(self, batch: list[Completion], error: Exception | None = None) -> None:
        for i, done in enumerate(batch):
            request_id, envelope, started = done.id, done.result, done.started
            if error is None or i > 0:
                try:
                    await self._complete([done], retries=1)
                    continue
                except Exception as exc:
                    error = exc
            if _transient(error) and self._transient_rounds < 10:
                self._transient_rounds += 1
                self._pending.append(done)
                continue
            name = self._names.get(request_id, "?")
            log.error("could not store the result of %s (%s, %d bytes): %s",
                      request_id, name, len(envelope), error)  # fmt: skip
            failure = RemoteError(
                "pygirder.ResultNotStored",
                f"the result of {name} ({len(envelope)} bytes) could not be stored on the "
                f"server: {error}. Raise the server's maxmemory (or free memory: `pygirder "
                "gc`), or return a smaller result (PYGIRDER_MAX_RESULT_BYTES bounds it)",
                "",
                [CallLink(request_id, name)],
            )
            small = Completion(request_id, encode_error(failure), self.error_ttl, started,
                               f"ResultNotStored: {error}"[:200])  # fmt: skip
            try:
                await self._complete([small], retries=self.retries)
                continue
            except Exception as exc:
                log.error("could not store an error for %s either (%s): handing it back",
                          request_id, exc)  # fmt: skip
            try:
                await scripts.requeue(
                    self.runtime, self.runtime.keys, [request_id], worker=self.worker_id
                )
                self._names.pop(request_id, None)
            except Exception as exc:  # server unreachable: keep it, try again later
                log.error("could not hand back %s (%s); retrying", request_id, exc)
                self._pending.append(small)
                await asyncio.sleep(1.0)

    async def _store_outside(self, batch: list[Completion]) -> list[Completion]:
        """Store the large results of ``batch`` with plain SETs; the batch for the
        script, with those results left empty.  Copied through a script's arguments a
        value is copied twice more inside the server, and a crash between the SET and
        the script only leaves a result that a re-run writes again."""
        out = []
        assert self.runtime.redis is not None
        for done in batch:
            envelope = done.result
            if isinstance(envelope, BytesEnvelope):  # head and value, written as they are
                key = self.runtime.keys.result(done.id)
                value = compress(bytes(envelope)) if self.compress else envelope.parts()
                await bulk.set_value(self.runtime.redis, key, value, ex=int(done.ttl) or None)
                done = done._replace(result=b"")
            elif len(envelope) > OUTSIDE_BYTES and envelope[:1] != ERR:
                key = self.runtime.keys.result(done.id)
                value = compress(envelope) if self.compress else envelope
                await bulk.set_value(self.runtime.redis, key, value, ex=int(done.ttl) or None)
                done = done._replace(result=b"")
            out.append(done)
        return out

    async def _complete(self, batch: list[Completion], *, retries: int) -> None:
        ids = [done.id for done in batch]
        # restored results are counted before the script makes them visible, so whoever
        # sees one sees it counted (and undone below when the batch fails)
        counted = await self._count_restored(ids)
        delay = 0.05
        try:
            for attempt in range(retries):
                try:
                    sent = await self._store_outside(batch)
                    idle, self._idle_pool = self._idle_pool, None
                    await scripts.complete(
                        self.runtime, self.runtime.keys, sent, worker=self.worker_id,
                        idle_pool=idle, resolved_here=True,
                    )  # fmt: skip
                    break
                except Exception as exc:
                    if attempt + 1 >= retries:
                        raise
                    log.warning("storing %d results failed (%s); retrying in %.2fs",
                                len(batch), exc, delay)  # fmt: skip
                    await asyncio.sleep(delay)
                    delay = min(2.0, delay * 4)
        except BaseException:
            self._restored.update(counted)  # counted again when they are stored
            self._uncounted -= len(counted)
            raise
        for request_id in ids:
            self._names.pop(request_id, None)
        await self.runtime.drop_payloads(ids)
        for hook in self.on_completed:
            hook(ids)

    async def _count_restored(self, ids: list[str]) -> list[str]:
        """The script counts every completion as executed: move the restored ones (the
        ids returned) to ``restored``.  A server out of memory refuses even this; the
        count is then kept and added with the next batch (or at the end, by ``drain``).
        """
        counted = [i for i in ids if i in self._restored]
        self._restored.difference_update(counted)
        self._uncounted += len(counted)
        if not self._uncounted:
            return counted
        assert self.runtime.redis is not None
        restored = self._uncounted
        try:
            async with self.runtime.redis.pipeline(transaction=True) as pipe:
                pipe.hincrby(self.runtime.keys.stats, "executed", -restored)
                pipe.hincrby(self.runtime.keys.stats, "restored", restored)
                await pipe.execute()
            self._uncounted -= restored
        except Exception as exc:  # only the counters are behind
            log.debug("could not count %d restored results yet: %s", restored, exc)
        return counted
