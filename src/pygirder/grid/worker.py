"""The worker: one asyncio loop per process, one request running Python at a time.

The event loop holds Girder's single "baton": a request runs only while it holds it
and gives it up whenever it waits on sub-calls, so a worker never sits idle behind a
waiting request and re-entrant calls to any depth cannot deadlock.  Sub-calls go on
the worker's local stack and are popped depth first; a periodic sharer moves the
oldest entries (nearest the root, the biggest) to the pool queue when other workers
of the pool are idle.  Sync functions run in threads (one per waiting request, reused),
async ones as tasks on the loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import importlib
import json
import logging
import os
import signal
import socket
import sys
import time
import types
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from .. import calls as calls_mod
from .. import codec
from ..calls import Call, GridFunction
from ..errors import GridFunctionError, RemoteError
from ..store.keys import HEARTBEAT_TTL_S
from ..store.scripts import INLINE_RESULT_LIMIT
from .context import RequestContext, current_request
from .runtime import (
    Runtime,
    connect_redis,
    decode_envelope,
    describe_exception,
    encode_error,
    encode_ok,
    new_process_id,
    summarize,
)

log = logging.getLogger("pygirder.worker")


class Baton:
    """The right to run Python code for a request.  Resuming requests go first.

    Giving priority to requests whose sub-calls are done over starting new ones keeps
    the worker depth first and bounds how much unfinished work it holds.
    """

    def __init__(self) -> None:
        self._held = False
        self._high: deque[asyncio.Future[None]] = deque()
        self._low: deque[asyncio.Future[None]] = deque()

    @property
    def held(self) -> bool:
        return self._held

    async def acquire(self, *, high: bool = False) -> None:
        if not self._held and not self._high and (high or not self._low):
            self._held = True
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        (self._high if high else self._low).append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # we were handed the baton just as we were cancelled
            else:
                (self._high if high else self._low).remove(fut)
            raise

    def release(self) -> None:
        for queue in (self._high, self._low):
            while queue:
                fut = queue.popleft()
                if not fut.done():
                    fut.set_result(None)  # ownership passes directly: _held stays True
                    return
        self._held = False


def load_main_script(path: str) -> None:
    """Import the client's script as ``__mp_main__``, as multiprocessing's spawn does.

    Its grid functions register under ``__main__:name``; its ``if __name__ ==
    "__main__":`` block does not run.
    """
    if "__mp_main__" in sys.modules:
        return
    module = types.ModuleType("__mp_main__")
    module.__file__ = path
    sys.modules["__mp_main__"] = module
    code = compile(Path(path).read_bytes(), path, "exec", dont_inherit=True)
    exec(code, module.__dict__)


class _RefusedRequest(Exception):
    """A request this worker must not run (unknown function, other code version)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Worker:
    """One worker process's runtime.  ``await worker.run()`` until ``stop()``."""

    def __init__(
        self,
        url: str,
        *,
        pool: str = "default",
        namespace: str = "default",
        worker_id: str | None = None,
        imports: tuple[str, ...] = (),
        auto_import: bool = False,
        main_path: str | None = None,
        share_period: float = 0.02,
        take_batch: int = 16,
        result_ttl: int = 0,
        error_ttl: int = 300,
        max_result_bytes: int | None = None,
        shutdown_grace: float = 30.0,
    ) -> None:
        self.id = worker_id or new_process_id("worker")
        self.pool = pool
        self.runtime = Runtime(url, namespace=namespace, process_id=self.id)
        self.keys = self.runtime.keys
        self.imports = imports
        self.auto_import = auto_import
        self.main_path = main_path
        self.share_period = share_period
        self.take_batch = take_batch
        self.result_ttl = result_ttl
        self.error_ttl = error_ttl
        self.max_result_bytes = max_result_bytes or codec.DEFAULT_LIMITS["max_result_bytes"]
        self.shutdown_grace = shutdown_grace
        self.stack: list[tuple[str, bytes]] = []
        self.baton = Baton()
        self.threads = ThreadPoolExecutor(max_workers=10_000, thread_name_prefix="pygirder-call")
        self.processed = 0
        self.running: dict[str, asyncio.Task[None]] = {}
        self.started = time.time()
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._fetch: asyncio.Task[Any] | None = None
        self._blocking: aioredis.Redis | None = None
        self._idle_marked = False
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- setup ------------------------------------------------------------------
    def load_code(self) -> None:
        if self.main_path:
            load_main_script(self.main_path)
        for module in self.imports:
            importlib.import_module(module)

    def _function(self, name: str, fingerprint: str) -> GridFunction[..., Any]:
        gf = calls_mod.lookup(name)
        if gf is None and self.auto_import:
            module = name.partition(":")[0]
            if module == "__main__":
                if self.main_path:
                    load_main_script(self.main_path)
            else:
                try:
                    importlib.import_module(module)
                except ImportError as exc:
                    raise _RefusedRequest(
                        "unknown function",
                        f"worker {self.id} cannot import module {module!r} for {name}: {exc}. "
                        "Make the module importable on the workers (same code, same sys.path)",
                    ) from None
            gf = calls_mod.lookup(name)
        if gf is None:
            raise _RefusedRequest(
                "unknown function",
                f"{name} is not a registered grid function on worker {self.id} (pool "
                f"{self.pool!r}); start the worker with `--import {name.partition(':')[0]}` "
                "so the module defining it is imported",
            )
        if gf.fingerprint != fingerprint:
            raise _RefusedRequest(
                "code version mismatch",
                f"code version mismatch for {name}: the caller's code has fingerprint "
                f"{fingerprint}, worker {self.id} has {gf.fingerprint}. Run the same code on "
                "callers and workers (restart the workers after changing it), or pin "
                "@pygirder.fn(version=...)",
            )
        return gf

    # -- main loop ------------------------------------------------------------
    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.load_code()
        await self.runtime.start()
        self._blocking = await connect_redis(self.runtime.url, max_connections=1)
        await self._register()
        background = [
            asyncio.create_task(self._heartbeat(), name="pygirder-heartbeat"),
            asyncio.create_task(self._share_loop(), name="pygirder-share"),
        ]
        log.info("worker %s serving pool %r", self.id, self.pool)
        try:
            await self._schedule()
        finally:
            await self._shutdown(background)

    def stop(self) -> None:
        """Stop taking work; hand back what is queued here; finish what is running."""
        self._stopping.set()
        self._wake.set()

    async def _register(self) -> None:
        assert self.runtime.redis is not None
        info = {
            "id": self.id, "host": socket.gethostname(), "pid": os.getpid(), "pool": self.pool,
            "started": self.started,
        }  # fmt: skip
        await self.runtime.redis.hset(self.keys.workers, self.id, json.dumps(info))
        await self.runtime.redis.set(self.keys.heartbeat(self.id), b"1", ex=HEARTBEAT_TTL_S)

    async def _heartbeat(self) -> None:
        assert self.runtime.redis is not None
        while True:
            await asyncio.sleep(HEARTBEAT_TTL_S / 4)
            try:
                await self.runtime.redis.set(self.keys.heartbeat(self.id), b"1", ex=HEARTBEAT_TTL_S)
            except Exception as exc:  # keep beating; the reaper decides what a gap means
                log.warning("heartbeat failed: %s", exc)

    async def _schedule(self) -> None:
        while not self._stopping.is_set():
            await self.baton.acquire()
            if self._stopping.is_set():
                self.baton.release()
                break
            if self.stack:
                request_id, payload = self.stack.pop()
                self._start(request_id, payload)  # the new task owns the baton
                continue
            self.baton.release()
            await self._idle()

    def _start(self, request_id: str, payload: bytes) -> None:
        task = asyncio.create_task(self._execute(request_id, payload))
        self.running[request_id] = task
        task.add_done_callback(lambda _t, rid=request_id: self.running.pop(rid, None))

    async def _idle(self) -> None:
        """Nothing local to do: take from the pool queue, or block until work appears.

        ``_wake`` is cleared before the first await: a request that resumes while we
        talk to the server and pushes sub-calls sets it again, and we must see that.
        """
        self._wake.clear()
        if self._fetch is None:
            if await self._take() or self._wake.is_set():
                return
            await self._mark_idle(True)
            if self._wake.is_set():
                await self._mark_idle(False)
                return
            assert self._blocking is not None
            self._fetch = asyncio.create_task(
                self._blocking.blmove(
                    self.keys.queue(self.pool), self.keys.inflight(self.id), 1.0, "RIGHT", "LEFT"
                )
            )
        waker = asyncio.create_task(self._wake.wait())
        try:
            await asyncio.wait({self._fetch, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waker.cancel()
        if self._fetch.done():
            fetch, self._fetch = self._fetch, None
            try:
                moved = fetch.result()
            except Exception as exc:
                log.warning("taking from pool %r failed: %s", self.pool, exc)
                await asyncio.sleep(0.2)
                return
            if moved is not None:
                await self._take(moved.decode())
        else:  # woken by local work while the blocking take is still outstanding
            await self._mark_idle(False)

    async def _mark_idle(self, idle: bool) -> None:
        if idle == self._idle_marked:
            return
        assert self.runtime.redis is not None
        key = self.keys.idle(self.pool)
        if idle:
            await self.runtime.redis.hset(key, self.id, str(time.time()))
        else:
            await self.runtime.redis.hdel(key, self.id)
        self._idle_marked = idle

    async def _take(self, moved: str | None = None) -> int:
        args: list[Any] = [self.keys.prefix, self.pool, self.id, self.take_batch]
        if moved is not None:
            args.append(moved)
        reply = await self.runtime.script("take", args)
        if reply:
            self._idle_marked = False  # the script cleared our idle mark
        items = [(reply[i].decode(), reply[i + 1]) for i in range(0, len(reply), 2)]
        self.stack.extend(reversed(items))
        return len(items)

    # -- running one request ----------------------------------------------------
    async def _execute(self, request_id: str, payload: bytes) -> None:
        name = "?"
        ttl = self.result_ttl
        started = time.time()
        summary = ""
        try:
            try:
                name, fingerprint, args_bytes = codec.decode(payload, path="request payload")
                gf = self._function(name, fingerprint)
                arguments = codec.decode(args_bytes, path=f"{name} arguments")
                args, kwargs = gf.bind_payload(arguments)
                ctx = RequestContext(self, request_id, name)
                current_request.set(ctx)  # this task's own context
                if gf.is_async:
                    value = await gf.func(*args, **kwargs)
                else:
                    run = functools.partial(gf.func, *args, **kwargs)
                    value = await self.loop.run_in_executor(  # type: ignore[union-attr]
                        self.threads, contextvars.copy_context().run, run
                    )
                envelope = encode_ok(value, name=name, limit=self.max_result_bytes)
                summary = summarize(value)
            except _RefusedRequest as exc:
                log.warning("refused %s: %s", request_id, exc)
                envelope = encode_error(RemoteError(exc.kind, str(exc), "", []))
                ttl = self.error_ttl
                summary = f"{exc.kind}: {exc}"[:200]
            except Exception as exc:
                error = describe_exception(exc, request_id, name)
                envelope = encode_error(error)
                ttl = self.error_ttl
                summary = f"{error.remote_type}: {error.message}"[:200]
        finally:
            self.baton.release()
            self._wake.set()
        self.processed += 1
        self.runtime.resolve(request_id, envelope)  # local waiters need not wait for the inbox
        await self.runtime.script(
            "complete",
            [
                self.keys.prefix,
                self.id,
                INLINE_RESULT_LIMIT,
                request_id,
                envelope,
                ttl,
                started,
                summary,
            ],
        )

    # -- waiting inside a request ---------------------------------------------
    async def gather(
        self, calls: list[Call[Any]], ctx: RequestContext, timeout: float | None
    ) -> list[Any]:
        for call in calls:
            if call.id == ctx.request_id:
                raise GridFunctionError(
                    f"{ctx.function} waits on itself (same arguments): a cycle that can never "
                    "finish"
                )
        futures, new_local = await self.runtime.submit(
            calls, owner=self.id, local_pool=self.pool, parent=ctx.request_id
        )
        if new_local:
            self.stack.extend(reversed(new_local))  # first call on top: it runs first
        if all(f.done() for f in futures):  # all memoized: keep the baton, no context switch
            return [decode_envelope(f.result()) for f in futures]
        self.baton.release()
        self._wake.set()
        try:
            return await self.runtime.wait(futures, calls, timeout)
        finally:
            await self.baton.acquire(high=True)

    def wait_from_thread(
        self, calls: list[Call[Any]], ctx: RequestContext, timeout: float | None
    ) -> list[Any]:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(
            self.gather(calls, ctx, timeout), self.loop
        ).result()

    # -- sharing ----------------------------------------------------------------
    async def _share_loop(self) -> None:
        last = self.processed
        while True:
            await asyncio.sleep(self.share_period)
            recent, last = self.processed - last, self.processed
            keep = max(1, recent)
            excess = len(self.stack) - keep
            if excess <= 0:
                continue
            count = (excess + 1) // 2
            candidates = self.stack[:count]
            del self.stack[:count]
            moved: set[bytes] = set()
            try:
                reply = await self.runtime.script(
                    "share",
                    [self.keys.prefix, self.pool, self.id, *(rid for rid, _ in candidates)],
                )
                moved = set(reply)
            except Exception as exc:
                log.warning("sharing failed: %s", exc)
            finally:
                kept = [item for item in candidates if item[0].encode() not in moved]
                self.stack[0:0] = kept

    # -- shutdown -----------------------------------------------------------------
    async def _shutdown(self, background: list[asyncio.Task[Any]]) -> None:
        redis = self.runtime.redis
        assert redis is not None
        if self._fetch is not None:
            self._fetch.cancel()
        # Hand back what has not started, then give running requests time to finish.
        waiting = [request_id for request_id, _ in self.stack]
        self.stack.clear()
        if waiting:
            await self.runtime.script("requeue", [self.keys.prefix, self.id, *waiting])
        if self.running:
            await asyncio.wait(list(self.running.values()), timeout=self.shutdown_grace)
        await self.runtime.script("requeue", [self.keys.prefix, self.id])
        for task in background:
            task.cancel()
        await redis.hdel(self.keys.idle(self.pool), self.id)
        await redis.hdel(self.keys.workers, self.id)
        await redis.delete(self.keys.heartbeat(self.id))
        if self._blocking is not None:
            await self._blocking.aclose()
        await self.runtime.close()
        self.threads.shutdown(wait=False, cancel_futures=True)


def run_worker(
    url: str,
    *,
    pool: str = "default",
    namespace: str = "default",
    imports: tuple[str, ...] = (),
    auto_import: bool = False,
    main_path: str | None = None,
    worker_id: str | None = None,
) -> None:
    """Run one worker in this process until SIGTERM/SIGINT."""

    async def main() -> None:
        worker = Worker(
            url, pool=pool, namespace=namespace, imports=imports, auto_import=auto_import,
            main_path=main_path, worker_id=worker_id,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        await worker.run()

    asyncio.run(main())
