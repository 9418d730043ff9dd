"""The worker's side of the durable result store: read through on take, write behind.

A request this worker takes (from the pool queue, or onto its stack as a sub-call) is
looked up in the store first, in one batch per take or per wait; a hit completes the
request as an execution would (the result stored in Valkey, every waiter notified)
and counts as ``restored``.  A hit is refused, and the call runs, when it is an error
and the function does not ask for ``cache_errors``, or when a function the call waited
on has other code now than when the result was computed (a stale result).

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
from concurrent.futures import Executor, ThreadPoolExecutor

from ... import calls as calls_mod
from ... import codec, settings
from ...results import Item, Meta, ResultStore
from ...results.writer import WriteBehind
from ..runtime import Runtime
from .functions import Functions, RefusedRequest
from .results import Results
from .sharing import StackEntry

log = logging.getLogger("pygirder.worker")

ERR = b"E"


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
        self._lookups = ThreadPoolExecutor(2, thread_name_prefix="pygirder-store-read")
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
        self.restored = 0
        self.stale = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    # -- read-through ---------------------------------------------------------------
    async def restore(self, entries: Sequence[StackEntry]) -> list[StackEntry]:
        """Complete the entries the store answers; returns the others, in order."""
        if not entries:
            return []
        ids = [e[0] for e in entries]
        present = self.store.present(ids)
        if present is not None:
            if not present:
                return list(entries)
            ids = present
        loop = asyncio.get_running_loop()
        try:
            found = await loop.run_in_executor(self._lookups, self.store.fetch, ids)
        except Exception as exc:  # the store unreadable: compute, never fail for it
            log.warning("result store %s: lookup failed (%s); computing instead",
                        self.store.url, exc)  # fmt: skip
            return list(entries)
        if not found:
            return list(entries)
        misses: list[StackEntry] = []
        for entry in entries:
            hit = found.get(entry[0])
            if hit is None or not await self._usable(entry, *hit):
                misses.append(entry)
                continue
            request_id, body = entry[0], hit[1]
            self.restored += 1
            self.runtime.resolve(request_id, body)
            self.results.add(request_id, hit[0].function, body, self.hot_ttl, 0.0,
                             "restored from the result store", restored=True)  # fmt: skip
        return misses

    async def _usable(self, entry: StackEntry, meta: Meta, body: bytes) -> bool:
        """A stored error only if its function keeps errors; nothing that is stale."""
        if body[:1] != ERR and not meta.deps:
            return True
        try:
            name, fingerprint, args_bytes = codec.decode(entry[1], path="request payload")
            gf = await self.functions.load(name, fingerprint, args_bytes, self.threads)
        except Exception:  # refused or undecodable: running it reports why
            return False
        if body[:1] == ERR and not gf.cache_errors:
            return False
        for dep, dep_fingerprint in meta.deps:
            current = calls_mod.lookup(dep)
            if current is None:
                try:
                    current = self.functions.lookup(dep, dep_fingerprint)
                except (RefusedRequest, Exception):
                    current = None
            if current is None or current.fingerprint != dep_fingerprint:
                self.stale += 1
                log.info("stored result of %s [%s] is stale (%s has other code now); "
                         "computing it again", name, entry[0][:12], dep)  # fmt: skip
                return False
        return True

    # -- write-behind ---------------------------------------------------------------
    def computed(
        self, request_id: str, name: str, fingerprint: str, envelope: bytes,
        deps: tuple[tuple[str, str], ...],
    ) -> None:  # fmt: skip
        """A result this worker computed: stored durably once Valkey has it."""
        self._computed[request_id] = Item(request_id, envelope, name, fingerprint, deps)
        self._sizes[request_id] = len(envelope)

    def _completed(self, ids: list[str]) -> None:
        items = [item for i in ids if (item := self._computed.pop(i, None)) is not None]
        if items:
            self.writer.offer(items)

    def _stored(self, ids: list[str]) -> None:
        """From the writer's thread: these results are durable, Valkey may let them go."""
        for request_id in ids:
            self._durable.append((request_id, self._sizes.pop(request_id, 0)))
        if self.hot_ttl and self._loop is not None and not self._loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._expire(ids), self._loop)

    async def _expire(self, ids: list[str]) -> None:
        redis = self.runtime.redis
        if redis is None:
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
        self._lookups.shutdown(wait=False)
        await loop.run_in_executor(None, self.store.close)

    def flush_now(self, timeout: float) -> None:
        """From any thread (the watchdog, before the process is replaced)."""
        self.writer.flush(timeout)
