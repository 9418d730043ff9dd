"""The worker: one asyncio loop per process, one request running Python at a time.

This module is the execution loop: take requests from the pool queue, run them
under the baton (``baton``), store what they return (``results``), park those that
wait on sub-calls, and hand work back on shutdown.  Around it run collaborators,
each with its own module: ``sharing`` offers the oldest local work to idle workers
of the pool, ``cycle_checks`` fails parked requests caught in a cycle, ``recovery``
requeues the work of dead workers and fails poison, ``watchdog`` enforces
``max_runtime``, and ``functions`` finds the function a request names.

Sub-calls go on the worker's local stack and are popped depth first.  Sync functions
run in threads (one per waiting request, reused), or inline on the loop's thread when
their runs are known to be short (``inline``); async ones run as tasks on the loop.
User code is hostile: whatever it raises (``SystemExit`` and other BaseExceptions
included) becomes an error for its callers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any

import redis.asyncio as aioredis

from ... import codec, settings
from ...calls import Call, GridFunction
from ...errors import (
    CodecError,
    ConfigError,
    GridCycleError,
    GridFunctionError,
    GridTimeout,
    RemoteError,
)
from ...results import open_store
from ...store import scripts
from ..connection import connect_redis
from ..context import RequestContext, current_request
from ..protocol import PAYLOAD_OUTSIDE, decode_envelope, encode_error, encode_result, summarize
from ..runtime import Runtime, all_done, new_process_id
from ..translate import describe_exception
from .baton import Baton, Threads
from .cycle_checks import CycleChecks, Parked
from .durable import DurableTier
from .functions import Functions, RefusedRequest
from .inline import Inline, UserExit
from .options import WorkerOptions
from .recovery import Recovery
from .results import Results
from .sharing import Sharing, StackEntry
from .watchdog import Watchdog, reexec

log = logging.getLogger("pygirder.worker")

COMMAND_CONNECTIONS = 1  # connections of a worker's command client (see Worker.__init__)
TAKE_BLOCK_S = 1.0  # seconds an idle worker's blocking take waits before it looks again


def _timed_out(
    futures: list[asyncio.Future[bytes]], calls: list[Call[Any]], timeout: float
) -> GridTimeout:
    """The error of a wait on sub-calls that ran out of time (as ``Runtime.wait``'s)."""
    missing = tuple(c.id for c, f in zip(calls, futures, strict=True) if not f.done())
    names = sorted({c.function.name for c, f in zip(calls, futures, strict=True) if not f.done()})
    return GridTimeout(
        f"{len(missing)} of {len(calls)} calls ({', '.join(names)}) did not finish within "
        f"{timeout}s; those not yet started were cancelled, started ones run to the end and "
        "their results are memoized",
        call_ids=missing,
    )


class HandedBack(BaseException):
    """Raised inside a parked request when its worker shuts down and requeues it.

    A BaseException, so user code's ``except Exception`` does not swallow it.
    """


async def _guarded_async(coro: Any) -> Any:
    """Await async user code; its BaseExceptions become :class:`UserExit`.

    ``HandedBack`` is the worker's own and passes through, as does a CancelledError
    when this task really was cancelled; one that user code raised on its own is an
    error of the call.
    """
    try:
        return await coro
    except (Exception, HandedBack):
        raise
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        raise UserExit(exc) from None
    except BaseException as exc:
        raise UserExit(exc) from None


class Worker:
    """One worker process's runtime.  ``await worker.run()`` until ``stop()``."""

    def __init__(self, url: str, options: WorkerOptions | None = None) -> None:
        options = options or WorkerOptions()
        self.options = options
        self.id = options.worker_id or new_process_id("worker")
        self.pool = options.pool
        # One connection for every command of this process (they wait for it in turn),
        # one for the blocking take and one for the inbox: a fixed number, so a large
        # grid neither grows its connections under load nor re-opens them.
        self.runtime = Runtime(
            url, namespace=options.namespace, process_id=self.id,
            max_connections=COMMAND_CONNECTIONS,
        )  # fmt: skip
        self.keys = self.runtime.keys
        self.runtime.on_handoff = self._handed_over
        self.max_result_bytes = options.max_result_bytes or settings.max_result_bytes()
        # default limit on the time one call holds the baton (0: none); @fn(max_runtime=)
        # overrides it per function
        self.max_runtime = (
            settings.max_runtime() if options.max_runtime is None else options.max_runtime
        )
        if self.max_runtime < 0:
            raise ConfigError(f"max_runtime {self.max_runtime}: give seconds > 0, or 0 for none")
        self._stack: list[StackEntry] = []
        self._handed: list[StackEntry] = []  # handed to us by a submit, not yet stacked
        self._careful: set[str] = set()  # requests suspected of an earlier worker death
        self.parked: dict[str, Parked] = {}
        self.running: dict[str, asyncio.Task[None]] = {}
        self._handed_back: set[str] = set()  # parked requests requeued on shutdown
        self.baton = Baton()
        self.threads = Threads(settings.idle_threads(), settings.thread_idle_s())
        self.inline = Inline()
        self.processed = 0
        self.started = time.time()
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._abnormal = False  # the loop ended by an error, not by stop()
        self._fetch: asyncio.Task[Any] | None = None
        self._blocking: aioredis.Redis | None = None
        self._idle_marked = False
        self._taking = 0
        self._beats = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self.functions = Functions(
            worker_id=self.id, pool=self.pool, imports=options.imports,
            allow_modules=options.allow_modules, auto_import=options.auto_import,
            main_path=options.main_path,
        )  # fmt: skip
        self.results = Results(self.runtime, worker_id=self.id, error_ttl=options.error_ttl)
        self.sharing = Sharing(
            self.runtime, pool=self.pool, worker_id=self.id, stack=self._stack,
            wake=self._wake, period=options.share_period, busy=lambda: self.baton.held,
        )  # fmt: skip
        self.runtime.on_share_now.append(self.sharing.kick)  # a peer went idle: offer now
        self.cycles = CycleChecks(self.runtime, self.parked)
        self.recovery = Recovery(
            self.runtime, worker_id=self.id, pool=self.pool, error_ttl=options.error_ttl
        )
        self.watchdog = Watchdog(
            self.runtime, worker_id=self.id, pool=self.pool, error_ttl=options.error_ttl,
            stopping=self._stopping, restart=self._restart, inline=self.inline,
        )  # fmt: skip
        self.durable: DurableTier | None = None
        store = open_store(options.store or None)
        if store is not None:
            self.durable = DurableTier(store, self.runtime, self.results, self.functions,
                                       self.threads)  # fmt: skip

    def _restart(self) -> None:
        """Replace the process (``max_runtime``), after storing what is still queued."""
        if self.durable is not None:
            self.durable.flush_now(5.0)
        (self.options.restart or reexec)()

    @property
    def stack(self) -> list[StackEntry]:
        """Requests to run here, newest last: changed in place only (``sharing`` holds it)."""
        return self._stack

    # -- main loop ------------------------------------------------------------
    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.functions.load_code()
        self.runtime.beat_hooks.append(self._register)
        self.runtime.on_server_restart.append(self._after_server_restart)
        await self.runtime.start()
        self._blocking = await connect_redis(self.runtime.url, max_connections=1,
                                             block=TAKE_BLOCK_S)  # fmt: skip
        background = [
            asyncio.create_task(self.sharing.run(lambda: self.processed), name="pygirder-share"),
            asyncio.create_task(self.recovery.reap_loop(), name="pygirder-reaper"),
            asyncio.create_task(self.cycles.run(), name="pygirder-cycles"),
        ]
        self.watchdog.start(self.loop)
        if self.durable is not None:
            self.durable.start(self.loop)
        log.info("worker %s serving pool %r (result store: %s)", self.id, self.pool,
                 self.durable.store.url if self.durable else "off")  # fmt: skip
        try:
            await self._schedule()
        except BaseException:
            # The loop was torn down (an exit raised outside any call's own code): what
            # held the baton is blamed as if the process had died with it.
            self._abnormal = not self._stopping.is_set()
            raise
        finally:
            await self._shutdown(background)

    def stop(self) -> None:
        """Stop taking work; hand back what is queued here; finish what is running."""
        self._stopping.set()
        self._wake.set()

    async def reap(self) -> list[str]:
        """Requeue the work of dead workers and withdraw dead clients (see ``recovery``)."""
        return await self.recovery.reap()

    async def _after_server_restart(self) -> None:
        """A fresh server has forgotten our idle mark: set it again when next idle."""
        self._idle_marked = False

    async def _register(self) -> None:
        """Publish who we are and what we do; runs at every heartbeat."""
        assert self.runtime.redis is not None
        info = {
            "id": self.id, "host": socket.gethostname(), "pid": os.getpid(), "pool": self.pool,
            "started": self.started, "beat": time.time(), "processed": self.processed,
            "running": len(self.running), "parked": len(self.parked), "stack": len(self.stack),
            "current": self.watchdog.holder, "current_fn": self.watchdog.holder_fn,
            "state": "busy" if self.baton.held or self.stack else "idle",
        }  # fmt: skip
        await self.runtime.redis.hset(self.keys.workers, self.id, json.dumps(info))
        self._beats += 1
        if self._beats % 4 == 0:
            await self.recovery.requeue_strays(self._known)

    def _known(self) -> set[bytes] | None:
        """The ids this worker holds, or None while a take is under way: those on its
        stack, out on offer, running, or finished with their result on its way."""
        if self._taking or self._fetch is not None:
            return None
        held = [*self.running, *(rid for rid, _, _ in self.stack),
                *(rid for rid, _, _ in self._handed)]  # fmt: skip
        storing = self.results.storing()
        return {rid.encode() for rid in (*held, *storing)} | self.sharing.offering

    def _handed_over(self, request_id: str, payload: bytes) -> None:
        """A submit handed us a request while we were idle (claimed for us, its mark
        in the idle table removed): run it as if a take had returned it."""
        self._handed.append((request_id, payload, False))
        self._idle_marked = False
        self._wake.set()

    async def _adopt_handed(self) -> None:
        """Stack what submits handed us (the durable store may answer some)."""
        items, self._handed = self._handed, []
        self._taking += 1  # neither handed nor stacked meanwhile: not stray
        try:
            if self.durable is not None:
                items = await self.durable.restore(items)
        finally:
            self._taking -= 1
        self.stack.extend(reversed(items))

    async def _schedule(self) -> None:
        while not self._stopping.is_set():
            if self._handed:  # run next, however busy this worker became since its mark
                await self._adopt_handed()
            if self._fetch is not None and self._fetch.done():
                # the blocking take moved a request to us while we were busy: claim it
                # now, not when the stack runs dry (until then it is no one's)
                await self._claim_fetched()
            await self.baton.acquire()
            if self._stopping.is_set():
                self.baton.release()
                break
            if self.stack:
                request_id, payload, careful = self.stack.pop()
                self._start(request_id, payload, careful)  # the new task owns the baton
                continue
            self.baton.release()
            try:
                await self._idle()
            except Exception as exc:  # a server error must not end the worker
                log.warning("taking from pool %r failed: %s", self.pool, exc)
                await asyncio.sleep(0.2)

    async def _mark_current(self, request_id: str | None) -> None:
        """Name the suspect holding the baton, so a repeat death is blamed on it alone."""
        assert self.runtime.redis is not None
        if request_id is None:
            await self.runtime.redis.delete(self.keys.current(self.id))
        else:
            await self.runtime.redis.set(self.keys.current(self.id), request_id)

    def _start(self, request_id: str, payload: bytes, careful: bool) -> None:
        if careful:
            self._careful.add(request_id)
        task = asyncio.create_task(self._execute(request_id, payload))
        self.running[request_id] = task
        task.add_done_callback(lambda _t, rid=request_id: self._finished(rid))

    def _finished(self, request_id: str) -> None:
        self.running.pop(request_id, None)
        self._careful.discard(request_id)
        self.watchdog.forget(request_id)
        self._handed_back.discard(request_id)

    async def _idle(self) -> None:
        """Nothing local to do: take from the pool queue, or block until work appears.

        ``_wake`` is cleared before the first await: a request that resumes while we
        talk to the server and pushes sub-calls sets it again, and we must see that.
        """
        self._wake.clear()
        self.results.send_now()  # nothing left to batch them with
        if self._handed:
            await self._adopt_handed()
            return
        if self._fetch is None or not self._idle_marked:
            # one script claims what is queued, or marks us idle (taking hand-offs) when
            # nothing is; a completion on its way marks us instead, saving the take
            marked = self._fetch is not None and self.results.mark_idle(self.pool)
            if not marked and (await self._take(waits=True) or self._wake.is_set()):
                await self._unmark_idle()
                return
            self._idle_marked = True
            if self._wake.is_set():
                await self._unmark_idle()
                return
        if self._fetch is None:
            assert self._blocking is not None
            queue, inflight = self.keys.queue(self.pool), self.keys.inflight(self.id)
            self._fetch = asyncio.create_task(
                self._blocking.blmove(queue, inflight, TAKE_BLOCK_S, "RIGHT", "LEFT")
            )
        waker = asyncio.create_task(self._wake.wait())
        try:
            await asyncio.wait({self._fetch, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waker.cancel()
        if self._fetch.done():
            await self._claim_fetched()
        else:  # woken by local work while the blocking take is still outstanding
            await self._unmark_idle()
        if self._handed:
            await self._adopt_handed()

    async def _claim_fetched(self) -> None:
        """Claim what the blocking take moved into our in-flight list, if anything."""
        assert self._fetch is not None
        fetch, self._fetch = self._fetch, None
        try:
            moved = fetch.result()
        except Exception as exc:
            log.warning("taking from pool %r failed: %s", self.pool, exc)
            await asyncio.sleep(0.2)
            return
        if moved is not None:
            await self._take(moved)  # bytes: a junk id need not be valid UTF-8

    async def _unmark_idle(self) -> None:
        """Drop our idle mark (set by a take that claimed nothing or by a completion,
        which also woke the latest offerer): we have local work again."""
        if not self._idle_marked:
            return
        assert self.runtime.redis is not None
        # a completion on its way may carry a mark: this must reach the server after it
        await self.results.idle_mark_sent()
        await self.runtime.redis.hdel(self.keys.idle(self.pool), self.id)
        self._idle_marked = False

    async def _take(self, moved: bytes | None = None, *, waits: bool = False) -> int:
        self._taking += 1
        try:
            return await self._take_once(moved, waits)
        finally:
            self._taking -= 1

    async def _take_once(self, moved: bytes | None, waits: bool) -> int:
        reply = await scripts.take(self.runtime, self.keys, pool=self.pool, worker=self.id,
                                   max=self.options.take_batch, moved=moved,
                                   waits=waits)  # fmt: skip
        if reply or waits:
            # the script cleared our idle mark (or, claiming nothing, set it)
            self._idle_marked = not reply
        items = []
        for i in range(0, len(reply), 3):
            raw = reply[i]
            try:
                request_id = raw.decode()
            except UnicodeDecodeError as exc:
                await self._drop_junk_id(raw, reply[i + 1], exc)
                continue
            items.append((request_id, reply[i + 1], reply[i + 2] != b"0"))
        taken = len(items)
        if self.durable is not None:
            items = await self.durable.restore(items)
        self.stack.extend(reversed(items))
        return taken

    async def _drop_junk_id(self, raw: bytes, payload: bytes, exc: Exception) -> None:
        """An id that is not text was never made by pygirder: dead-letter it and forget it
        (put back on the queue, it would come back again and again)."""
        assert self.runtime.redis is not None
        await self._dead_letter(f"<undecodable id {raw[:64].hex()}>", payload, exc)
        async with self.runtime.redis.pipeline(transaction=True) as pipe:
            pipe.lrem(self.keys.inflight(self.id), 0, raw)
            pipe.delete(self.keys.state("").encode() + raw)
            await pipe.execute()

    # -- running one request ----------------------------------------------------
    async def _execute(self, request_id: str, payload: bytes) -> None:
        name = fingerprint = "?"
        ttl = self.options.result_ttl
        durable = False  # the outcome goes to the durable store too
        ctx: RequestContext | None = None
        started = time.time()
        summary = ""
        try:
            try:
                try:
                    if payload == PAYLOAD_OUTSIDE:  # a large one, stored beside the request
                        payload = await self.runtime.read_payload(request_id)
                    name, fingerprint, args_bytes = codec.decode(payload, path="request payload")
                except (CodecError, ValueError, TypeError) as exc:
                    await self._dead_letter(request_id, payload, exc)
                    raise RefusedRequest(
                        "undecodable request", f"request {request_id}: {exc}"
                    ) from None
                gf = await self.functions.load(name, fingerprint, args_bytes, self.threads)
                durable = gf.cache_errors  # errors from here on are the function's own
                arguments = codec.decode(args_bytes, path=f"{name} arguments")
                args, kwargs = gf.bind_payload(arguments)
                ctx = RequestContext(self, request_id, name)
                current_request.set(ctx)  # this task's own context
                limit = gf.max_runtime or self.max_runtime
                if limit:
                    self.watchdog.limit(request_id, limit)
                self.watchdog.hold(request_id, name)
                if request_id in self._careful:
                    await self._mark_current(request_id)
                if gf.is_async:
                    value = await _guarded_async(gf.func(*args, **kwargs))
                else:
                    value = await self._run_sync(gf, functools.partial(gf.func, *args, **kwargs))
                envelope = encode_result(
                    value, name=name, limit=self.max_result_bytes, request_id=request_id
                )
                summary = summarize(value)
                durable = True
            except RefusedRequest as exc:
                durable = False
                log.warning("refused %s: %s", request_id, exc)
                envelope = encode_error(RemoteError(exc.kind, str(exc), "", []))
                ttl = self.options.error_ttl
                summary = f"{exc.kind}: {exc}"[:200]
            except HandedBack:
                return  # requeued for another worker: this run's outcome must not count
            except Exception as exc:
                if request_id in self._handed_back:
                    return  # user code turned the hand-back into an error of its own
                cause = exc.original if isinstance(exc, UserExit) else exc
                error = describe_exception(cause, request_id, name)
                envelope = encode_error(error)
                ttl = self.options.error_ttl
                summary = f"{error.remote_type}: {error.message}"[:200]
        finally:
            if request_id in self._careful:
                await self._mark_current(None)
            self.watchdog.hold(None)
            self.baton.release()
            self._wake.set()
        if request_id in self._handed_back:
            return  # it returned after all, but it is queued again: the rerun answers
        self.processed += 1
        self.runtime.resolve(request_id, envelope)  # local waiters need not wait for the inbox
        if durable and self.durable is not None:
            deps = tuple(sorted(ctx.deps.items())) if ctx is not None else ()
            self.durable.computed(request_id, name, fingerprint, envelope, deps)
        # held back for others that finish soon (at most GATHER_S): a worker that runs
        # out of work sends at once (``_idle``), one still busy batches its completions,
        # a nested call's among them (its parent resumes here, not on the stack)
        self.results.add(request_id, name, envelope, ttl, started, summary, more=True)
        if self.durable is not None:
            await self.durable.room()  # a store far behind slows the worker, not its memory

    async def _run_sync(self, gf: GridFunction[..., Any], run: Callable[[], Any]) -> Any:
        """A sync call: inline when its function's last runs were short (see ``inline``),
        else (and when the inline run had to stop) on a thread."""
        if self.inline.ready(gf):
            done, value = self.inline.run(gf, run)
            if done:
                return value
        assert self.loop is not None
        return await self.threads.run_soon(
            self.loop, functools.partial(contextvars.copy_context().run, self.inline.timed(gf, run))
        )

    async def _dead_letter(self, request_id: str, payload: bytes, exc: BaseException) -> None:
        """Keep what could not be decoded for inspection, and never crash over it."""
        assert self.runtime.redis is not None
        log.error("undecodable request %s moved to the dead-letter list: %s", request_id, exc)
        entry = json.dumps({"id": request_id, "worker": self.id, "time": time.time(),
                            "error": str(exc)[:500], "payload": payload[:256].hex()})  # fmt: skip
        async with self.runtime.redis.pipeline(transaction=True) as pipe:
            pipe.lpush(self.keys.dead_letters, entry)
            pipe.ltrim(self.keys.dead_letters, 0, 999)
            await pipe.execute()

    # -- waiting inside a request ---------------------------------------------
    async def gather(
        self, calls: list[Call[Any]], ctx: RequestContext, timeout: float | None
    ) -> list[Any]:
        for call in calls:
            if call.id == ctx.request_id:
                raise GridCycleError(
                    f"cycle: {ctx.function}[{ctx.request_id[:12]}] waits on itself",
                    cycle=(ctx.request_id, ctx.request_id),
                )
        for call in calls:
            ctx.deps[call.function.name] = call.function.fingerprint
        futures, new_local, shared = await self.runtime.submit(
            calls, owner=self.id, local_pool=self.pool, parent=ctx.request_id
        )
        entries = [(rid, payload, False) for rid, payload in new_local]
        if entries and self.durable is not None:
            entries = await self.durable.restore(entries)
        if entries:
            fan_out = len(self.stack) <= 1 < len(self.stack) + len(entries)
            self.stack.extend(reversed(entries))
            if len(self.stack) > self.options.max_stack:
                await self.sharing.share(len(self.stack) - self.options.max_stack, force=True)
            elif fan_out:  # idle peers start on it now, not when a running child lets us
                await self.sharing.offer()
        if all(f.done() for f in futures):  # all memoized: keep the baton, no context switch
            return [decode_envelope(f.result(), c.id) for f, c in zip(futures, calls, strict=True)]
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        parked = Parked(
            children=shared,  # a new request cannot reach us: only shared ones can cycle
            since=now, cycle=loop.create_future(), next_check=now + self.cycles.check_after,
        )  # fmt: skip
        self.parked[ctx.request_id] = parked
        careful = ctx.request_id in self._careful
        if careful:
            await self._mark_current(None)
        self.watchdog.hold(None)
        self.baton.release()
        self._wake.set()
        try:
            return await self._await_children(futures, calls, parked, timeout)
        finally:
            self.parked.pop(ctx.request_id, None)
            await self.baton.acquire(high=True)
            self.watchdog.hold(ctx.request_id, ctx.function)
            if careful:
                await self._mark_current(ctx.request_id)

    async def _await_children(
        self,
        futures: list[asyncio.Future[bytes]],
        calls: list[Call[Any]],
        parked: Parked,
        timeout: float | None,
    ) -> list[Any]:
        """The children's results in call order (the first failure in call order is
        raised), or the cycle error ``parked.cycle`` carries, whichever comes first.

        One future woken by done-callbacks (``all_done``, which the cycle future wakes
        too), not a task running ``Runtime.wait`` per wait: a nested call waits here
        once per run.
        A waiter that gives up (time-out, cycle, hand-back, cancellation) withdraws
        its interest, as ``Runtime.wait``'s does: what nobody here waits for any more is
        cancelled on the grid, which drops it if it has not started."""
        ids = [c.id for c in calls]
        runtime = self.runtime
        runtime.hold(ids, futures)
        finished = False
        try:
            pending = [f for f in futures if not f.done()]
            if pending and not await all_done(pending, timeout, also=parked.cycle):
                if not parked.cycle.done():
                    raise _timed_out(futures, calls, timeout)
                raise parked.cycle.exception() or parked.cycle.result()
            values = [decode_envelope(f.result(), i) for f, i in zip(futures, ids, strict=True)]
            finished = True
            return values
        finally:
            if finished or all(f.done() for f in futures):
                runtime.let_go_local(ids)
            else:
                await asyncio.shield(runtime.let_go(ids, futures))

    def wait_from_thread(
        self, calls: list[Call[Any]], ctx: RequestContext, timeout: float | None
    ) -> list[Any]:
        assert self.loop is not None
        self.inline.waited(ctx.function)
        self.inline.check_waitable()  # a call inline goes to a thread, where it may wait
        if threading.get_ident() == self._loop_thread:
            raise GridFunctionError(
                f"{ctx.function} waits with a blocking call (pygirder.wait, call.result()) on "
                "the worker's event loop, which would stop the worker: in an async grid "
                "function use `await pygirder.gather(...)` or `await call`"
            )
        # As run_coroutine_threadsafe, with a SimpleQueue for the reply in place of a
        # concurrent.futures future and its chaining: every nested wait of a sync call
        # crosses here twice.
        loop = self.loop
        reply: SimpleQueue[asyncio.Future[list[Any]]] = SimpleQueue()

        def start() -> None:
            task = loop.create_task(self.gather(calls, ctx, timeout))
            task.add_done_callback(reply.put)

        loop.call_soon_threadsafe(start)
        done = reply.get()
        if done.cancelled():  # as run_coroutine_threadsafe's future would say it
            raise concurrent.futures.CancelledError()
        return done.result()

    # -- shutdown -----------------------------------------------------------------
    async def _shutdown(self, background: list[asyncio.Task[Any]]) -> None:
        try:
            await asyncio.wait_for(self._hand_back(), self.options.shutdown_grace + 10)
        except Exception as exc:  # server gone: the reaper requeues our work instead
            log.warning("could not hand back work on shutdown: %s", exc)
        finally:
            if self.durable is not None:
                try:  # before the connection goes: stored results then get their TTL
                    await self.durable.close(settings.store_flush_s())
                except Exception as exc:
                    log.warning("could not finish writing to the result store: %s", exc)
            for task in background:
                task.cancel()
            if self._blocking is not None:
                await self._blocking.aclose()
            await self.runtime.close()
            self.threads.shutdown(wait=False)

    async def _hand_back(self) -> None:
        redis = self.runtime.redis
        assert redis is not None
        if self._fetch is not None:
            self._fetch.cancel()
        holder = self.watchdog.holder  # before any await: a torn-down loop unwinds it
        # no more hand-offs: one that came before this is in our in-flight list, which
        # is handed back below
        await redis.hdel(self.keys.idle(self.pool), self.id)
        self._idle_marked = False
        if self._abnormal:
            await self.recovery.hand_back_after_crash(holder, self.results.flush)
            return
        # Hand back what has not started and what waits on sub-calls (it can be re-run
        # anywhere); give the request that is computing time to finish.
        waiting = [request_id for request_id, _, _ in [*self.stack, *self._handed]]
        self.stack.clear()
        self._handed.clear()
        parked = list(self.parked)
        if waiting or parked:
            await self.recovery.requeue_ids([*waiting, *parked])
        for request_id in parked:
            entry = self.parked.get(request_id)
            if entry is not None and not entry.cycle.done():
                self._handed_back.add(request_id)
                entry.cycle.set_exception(HandedBack())
        if self.running:
            await asyncio.wait(list(self.running.values()), timeout=self.options.shutdown_grace)
        await self.results.drain()
        await self.recovery.requeue_all(self.id, dead=False)
        async with redis.pipeline(transaction=False) as pipe:
            pipe.hdel(self.keys.idle(self.pool), self.id)
            pipe.zrem(self.keys.offers(self.pool), self.id)
            pipe.hdel(self.keys.workers, self.id)
            await pipe.execute()
