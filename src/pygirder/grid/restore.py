"""Answering requests from the durable result store, as an execution would.

:class:`Restorer` looks a batch of requests up in the store (one lookup, in a thread,
off the event loop), applies the rules of ``results.rules`` (a stored error only with
``cache_errors``, nothing stale) and completes each hit through the worker's
completion path: the result stored in Valkey, every waiter notified, counted as
``restored``.  A worker restores what it takes; :class:`StoreOnlyAnswers` restores what
the client of a private grid without workers submits, where nothing else ever would,
and fails at once what the store cannot answer instead of leaving it queued forever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from .. import settings
from ..errors import NotStored
from ..results import ResultStore
from ..results.rules import Current, Refusal, needs_function, refusal, registered
from ..store import scripts

if TYPE_CHECKING:
    from ..calls import Call, GridFunction
    from .runtime import Runtime
    from .worker.results import Results

log = logging.getLogger("pygirder.results")

E = TypeVar("E", bound=tuple[Any, ...])  # (request id, payload, ...)

#: The grid function a request runs, found from its id and payload; raises when it
#: cannot be found (the request then runs, or fails, and says why).
FunctionOf = Callable[[str, bytes], Awaitable["GridFunction[..., Any]"]]


class Restorer:
    """Read-through from one store into one process's completion path."""

    def __init__(
        self,
        store: ResultStore,
        runtime: Runtime,
        results: Results,
        *,
        function_of: FunctionOf,
        current: Current = registered,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.results = results
        self.function_of = function_of
        self.current = current
        self.hot_ttl = settings.hot_result_ttl()
        self._lookups = ThreadPoolExecutor(2, thread_name_prefix="pygirder-store-read")
        self.restored = 0
        self.stale = 0

    async def restore(self, entries: Sequence[E]) -> tuple[list[E], dict[str, Refusal]]:
        """Complete the entries the store answers.  Returns the others, in order, and for
        those whose stored result was refused, why.  Raises when the store cannot be read.
        """
        if not entries:
            return [], {}
        ids = [e[0] for e in entries]
        present = self.store.present(ids)
        if present is not None:
            if not present:
                return list(entries), {}
            ids = present
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(self._lookups, self.store.fetch, ids)
        if not found:
            return list(entries), {}
        misses: list[E] = []
        refused: dict[str, Refusal] = {}
        for entry in entries:
            request_id = entry[0]
            hit = found.get(request_id)
            if hit is None:
                misses.append(entry)
                continue
            meta, body = hit
            if needs_function(meta, body):
                try:
                    gf = await self.function_of(request_id, entry[1])
                except Exception:  # refused or undecodable: running it reports why
                    misses.append(entry)
                    continue
                why = refusal(meta, body, gf, self.current)
                if why is not None:
                    if why.kind == "stale":
                        self.stale += 1
                        log.info("stored result of %s [%s] is stale (%s); not using it",
                                 gf.name, request_id[:12], why.reason)  # fmt: skip
                    refused[request_id] = why
                    misses.append(entry)
                    continue
            self.restored += 1
            self.runtime.resolve(request_id, body)
            self.results.add(request_id, meta.function, body, self.hot_ttl, 0.0,
                             "restored from the result store", restored=True)  # fmt: skip
        return misses, refused

    def close(self) -> None:
        self._lookups.shutdown(wait=False)


class StoreOnlyAnswers:
    """The client side of a private grid without workers: its store answers its calls.

    Installed as the runtime's ``answer_queued`` hook, it sees the calls a submission
    queued as new, restores those the store holds, and fails the others with
    :class:`NotStored` (and cancels them on the server), unless a worker has joined the
    grid since, which then runs them.  ``store`` None (turned off) answers nothing.
    """

    def __init__(self, runtime: Runtime, store: ResultStore | None) -> None:
        from .worker.results import Results

        self.runtime = runtime
        self.store = store
        self.results = Results(runtime, worker_id=runtime.process_id, error_ttl=300)
        self._calls: dict[str, Call[Any]] = {}
        self.restorer = (
            Restorer(store, runtime, self.results, function_of=self._function_of)
            if store is not None
            else None
        )

    async def _function_of(self, request_id: str, payload: bytes) -> GridFunction[..., Any]:
        return self._calls[request_id].function

    async def __call__(self, calls: Sequence[Call[Any]]) -> None:
        entries = [(c.id, b"") for c in calls]
        misses: list[tuple[str, bytes]] = entries
        refused: dict[str, Refusal] = {}
        failure = ""
        if self.restorer is not None:
            self._calls.update((c.id, c) for c in calls)
            try:
                misses, refused = await self.restorer.restore(entries)
            except Exception as exc:
                failure = f"{type(exc).__name__}: {exc}"
                log.warning("result store %s: lookup failed (%s)", self.store, failure)
            finally:
                for c in calls:
                    self._calls.pop(c.id, None)
            await self.results.drain()  # counted as restored before the caller sees them
        if not misses or await self._workers_joined():
            return
        names = {c.id: c.function.name for c in calls}
        for request_id, _ in misses:
            error = self._error(request_id, names[request_id], refused.get(request_id), failure)
            self.runtime.fail(request_id, error)
        ids = [request_id for request_id, _ in misses]
        for start in range(0, len(ids), scripts.CANCEL_CHUNK):  # nothing is left queued
            chunk = ids[start : start + scripts.CANCEL_CHUNK]
            await scripts.cancel(self.runtime, self.runtime.keys, chunk,
                                 process=self.runtime.process_id)  # fmt: skip

    async def _workers_joined(self) -> bool:
        """A worker started by hand against this grid's URL runs what is queued."""
        assert self.runtime.redis is not None
        return bool(await self.runtime.redis.hlen(self.runtime.keys.workers))

    def _error(
        self, request_id: str, name: str, refused: Refusal | None, failure: str
    ) -> NotStored:
        fix = (
            "start workers to compute it (pygirder.connect(store=..., workers=N), or "
            "grid.add_workers(N))"
        )
        grid = "this grid has no workers (connect(workers=0))"
        if self.store is None:
            return NotStored(
                f"{name} (request {request_id}) cannot run: {grid} and its result store is "
                f"off; {fix}, or give connect() the store that holds it",
                call_id=request_id,
            )
        where = self.store.url
        if failure:
            return NotStored(
                f"{name} (request {request_id}) cannot run: {grid} and its result store "
                f"{where} could not be read ({failure}); check the store URL and "
                f"credentials, or {fix}",
                call_id=request_id, reason="unreadable",
            )  # fmt: skip
        if refused is not None:
            return NotStored(
                f"{name} (request {request_id}) cannot run: {grid}, and its result store "
                f"{where} holds a result that must not be used: {refused.reason}; {fix}",
                call_id=request_id, reason=refused.kind,
            )  # fmt: skip
        return NotStored(
            f"{name} (request {request_id}) cannot run: {grid}, and its result store "
            f"{where} holds no result of it (never stored there, or pruned); check the "
            f"store URL, or {fix}",
            call_id=request_id,
        )

    async def close(self) -> None:
        await self.results.drain()
        if self.restorer is not None:
            self.restorer.close()
        if self.store is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.store.close)
