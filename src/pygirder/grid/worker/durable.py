"""The worker's side of the durable result store: read through on take, write behind.

A request this worker takes (from the pool queue, or onto its stack as a sub-call) is
looked up in the store first, in one batch per take or per wait (``grid.restore``); a
hit completes the request as an execution would (the result stored in Valkey, every
waiter notified) and counts as ``restored``.  A hit is refused, and the call runs, when
it is an error and the function does not ask for ``cache_errors``, or when a function
the call waited on has other code now than when the result was computed (a stale
result; ``results.rules``).  The worker imports a function's module to check it.

Every result this worker computes goes to the store after Valkey has it, from a
thread (``results.writer``), off the path to its waiters.  Once the store holds a
result, its Valkey key gets the hot-tier TTL (``PYGIRDER_HOT_TTL``), so Valkey keeps
recent results only and its memory no longer grows with every result ever computed;
a result not (yet) durable never expires that way.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any

from ... import calls as calls_mod
from ... import codec, settings
from ...calls import GridFunction
from ...results import Item, ResultStore
from ...results.writer import WriteBehind
from ..protocol import PAYLOAD_OUTSIDE, Envelope
from ..restore import Restorer
from ..runtime import Runtime
from .functions import Functions
from .results import Results
from .sharing import StackEntry

log = logging.getLogger("pygirder.worker")

EXPIRE_EVERY_S = 0.5


class DurableTier:
    """Read-through and write-behind between one worker and a result store."""

    def __init__(
        self,
        store: ResultStore,
        runtime: Runtime,
        results: Results,
        functions: Functions,
        threads: Executor,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.results = results
        self.functions = functions
        self.threads = threads
        self.hot_ttl = settings.hot_result_ttl()
        self.reader = Restorer(store, runtime, results, function_of=self._function_of,
                               current=self._current)  # fmt: skip
        self._loop: asyncio.AbstractEventLoop | None = None
        self._computed: dict[str, Item] = {}  # results on their way to Valkey
        self.writer = WriteBehind(store, on_stored=self._stored)
        results.on_completed.append(self._completed)
        results.make_room = self.make_room
        # results this worker made durable, oldest first, with their sizes: the ones it
        # drops from Valkey when the server is out of memory
        self._durable: deque[tuple[str, int]] = deque(maxlen=100_000)
        self._sizes: dict[str, int] = {}
        self.dropped = 0
        self._to_expire: list[str] = []  # stored, waiting for their hot-tier TTL
        self._expiring = False  # an _expire round is scheduled

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    # -- read-through ---------------------------------------------------------------
    async def restore(self, entries: Sequence[StackEntry]) -> list[StackEntry]:
        """Complete the entries the store answers; returns the others, in order."""
        try:
            misses, _ = await self.reader.restore(entries)
        except Exception as exc:  # the store unreadable: compute, never fail for it
            log.warning("result store %s: lookup failed (%s); computing instead",
                        self.store.url, exc)  # fmt: skip
            return list(entries)
        return misses

    async def _function_of(self, request_id: str, payload: bytes) -> GridFunction[..., Any]:
        if payload == PAYLOAD_OUTSIDE:  # a large one, stored beside the request
            payload = await self.runtime.read_payload(request_id)
        name, fingerprint, args_bytes = codec.decode(payload, path="request payload")
        return await self.functions.load(name, fingerprint, args_bytes, self.threads)

    def _current(self, name: str, fingerprint: str) -> GridFunction[..., Any] | None:
        """A function a stored result waited on, imported (as a request would) if need be."""
        current = calls_mod.lookup(name)
        if current is None:
            try:
                current = self.functions.lookup(name, fingerprint)
            except Exception:  # RefusedRequest included: it cannot be checked
                current = None
        return current

    # -- write-behind ---------------------------------------------------------------
    def computed(
        self, request_id: str, name: str, fingerprint: str, envelope: Envelope,
        deps: tuple[tuple[str, str], ...],
    ) -> None:  # fmt: skip
        """A result this worker computed: stored durably once Valkey has it."""
        body = envelope if isinstance(envelope, bytes) else bytes(envelope)
        self._computed[request_id] = Item(request_id, body, name, fingerprint, deps)
        self._sizes[request_id] = len(envelope)

    def _completed(self, ids: list[str]) -> None:
        items = [item for i in ids if (item := self._computed.pop(i, None)) is not None]
        if items:
            self.writer.offer(items)

    def _stored(self, ids: list[str]) -> None:
        """From the writer's thread: these results are durable, Valkey may let them go."""
        for request_id in ids:
            self._durable.append((request_id, self._sizes.pop(request_id, 0)))
        if not self.hot_ttl or self._loop is None or self._loop.is_closed():
            return
        self._to_expire.extend(ids)
        if not self._expiring:
            self._expiring = True
            asyncio.run_coroutine_threadsafe(self._expire(), self._loop)

    async def _expire(self, wait: float = EXPIRE_EVERY_S) -> None:
        """Give stored results the hot-tier TTL, gathered over ``EXPIRE_EVERY_S``: one
        round trip (and one wake-up of the loop) for many of the writer's batches."""
        await asyncio.sleep(wait)
        self._expiring = False  # first: ids stored from now on schedule another round
        ids, self._to_expire = self._to_expire, []
        redis = self.runtime.redis
        if redis is None or not ids:
            return
        try:
            async with redis.pipeline(transaction=False) as pipe:
                for request_id in ids:
                    pipe.expire(self.runtime.keys.result(request_id), self.hot_ttl, nx=True)
                await pipe.execute()
        except Exception as exc:  # the result just stays in Valkey longer
            log.debug("could not set the hot-tier TTL of %d results: %s", len(ids), exc)

    async def make_room(self, needed: int) -> int:
        """The server is out of memory: drop from it results the store holds (the oldest
        this worker stored), at least ``needed`` bytes and 8 MB.  Never grid state: a
        later reader of a dropped result submits it again and a worker restores it."""
        redis = self.runtime.redis
        if redis is None or not self._durable:
            return 0
        goal, freed, ids = max(needed, 8 * 1024**2), 0, []
        while self._durable and freed < goal:
            request_id, size = self._durable.popleft()
            ids.append(self.runtime.keys.result(request_id))
            freed += size
        await redis.unlink(*ids)
        self.dropped += len(ids)
        log.info("server out of memory: dropped %d results (%d bytes) the result store "
                 "holds", len(ids), freed)  # fmt: skip
        return freed

    async def room(self) -> None:
        """Wait (off the loop) while the writer is too far behind."""
        if self.writer.behind:
            await asyncio.get_running_loop().run_in_executor(None, self.writer.wait_room)

    async def close(self, timeout: float) -> None:
        """Store what is still queued (up to ``timeout``), then let the store go."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.writer.close, timeout)
        await self._expire(0)  # what was stored last, before the connection goes
        self.reader.close()
        await loop.run_in_executor(None, self.store.close)

    def flush_now(self, timeout: float) -> None:
        """From any thread (the watchdog, before the process is replaced)."""
        self.writer.flush(timeout)
