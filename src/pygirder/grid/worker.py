"""The worker: one asyncio loop per process, one request running Python at a time.

The event loop holds Girder's single "baton": a request runs only while it holds it
and gives it up whenever it waits on sub-calls, so a worker never sits idle behind a
waiting request and re-entrant calls to any depth cannot deadlock.  Sub-calls go on
the worker's local stack and are popped depth first; a periodic sharer moves the
oldest entries (nearest the root, the biggest) to the pool queue when other workers
of the pool are idle.  Sync functions run in threads (one per waiting request, reused),
async ones as tasks on the loop.

User code is hostile: whatever it raises (``SystemExit`` and other BaseExceptions
included) becomes an error for its callers, and a watchdog thread restarts the process
when a call computes longer than its ``max_runtime``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import importlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from queue import Empty, SimpleQueue
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from .. import calls as calls_mod
from .. import codec, settings
from ..calls import Call, GridFunction
from ..errors import CallLink, CodecError, ConfigError, GridCycleError, RemoteError
from ..store import scripts
from ..store.scripts import INLINE_RESULT_LIMIT
from . import loading, recovery
from .context import RequestContext, current_request
from .cycles import STEP_BUDGET, CycleSearch
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

COMMAND_CONNECTIONS = 1  # connections of a worker's command client (see Worker.__init__)


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
                with contextlib.suppress(ValueError):  # release() may have dropped it
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


@dataclass
class _Parked:
    """A request waiting on sub-calls, watched for cycles."""

    children: list[str]
    since: float
    cycle: asyncio.Future[GridCycleError]  # also carries HandedBack on shutdown
    next_check: float
    search: CycleSearch | None = None  # the cycle search under way, between steps


class HandedBack(BaseException):
    """Raised inside a parked request when its worker shuts down and requeues it.

    A BaseException, so user code's ``except Exception`` does not swallow it.
    """


class _RefusedRequest(Exception):
    """A request this worker must not run (unknown function, other code version)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _UserExit(Exception):
    """Carries a BaseException raised by user code (``sys.exit()``, ``KeyboardInterrupt``,
    ``GeneratorExit``...) out of it as an ordinary error, so it fails the call and never
    reaches the event loop, which would stop the worker."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(repr(original))
        self.original = original


def _guarded(run: Callable[[], Any]) -> Any:
    """Run sync user code in its thread; what it raises comes back as an Exception.

    A BaseException set on the executor's future would be re-raised inside the event
    loop's task, and asyncio lets SystemExit and KeyboardInterrupt end the loop.
    """
    try:
        return run()
    except Exception:
        raise
    except BaseException as exc:
        raise _UserExit(exc) from None


async def _guarded_async(coro: Any) -> Any:
    """Await async user code; its BaseExceptions become :class:`_UserExit`.

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
        raise _UserExit(exc) from None
    except BaseException as exc:
        raise _UserExit(exc) from None


def _transient(exc: BaseException | None) -> bool:
    """An error that says "later", not "never" (the server unreachable, busy, loading)."""
    if isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError | OSError):
        return True
    return str(exc).startswith(("BUSY", "LOADING", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN"))


class _Threads(Executor):
    """Threads for sync calls: a free thread is reused, else a new one starts at once.

    A sync call that waits on sub-calls keeps its thread while parked, so a bounded pool
    (concurrent.futures queues work once ``max_workers`` threads exist) would stop the
    worker for good once parked calls held every thread: the next call would wait for
    a thread while holding the baton.  The number of threads is bounded by the calls
    parked on this worker instead; idle ones beyond ``keep`` exit at once, the others
    after ``idle_s`` seconds without work.  Threads are daemons, so a call that never
    returns cannot keep the process from exiting.
    """

    def __init__(self, keep: int, idle_s: float, prefix: str = "pygirder-call") -> None:
        self.keep = keep
        self.idle_s = idle_s
        self.prefix = prefix
        self._lock = threading.Lock()
        self._jobs: SimpleQueue[Any] = SimpleQueue()
        self._idle = 0  # threads waiting on _jobs and not yet promised a job
        self._started = 0
        self.alive = 0
        self._closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        job = (fut, fn, args, kwargs)
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot run a call after the worker shut down")
            if self._idle:
                self._idle -= 1  # promised to one waiting thread
                self._jobs.put(job)
                return fut
            self._started += 1
            self.alive += 1
            name = f"{self.prefix}-{self._started}"
        threading.Thread(target=self._serve, args=(job,), name=name, daemon=True).start()
        return fut

    def _serve(self, job: Any) -> None:
        while job is not None:
            fut, fn, args, kwargs = job
            job = None
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # handed to the waiter, as concurrent.futures does
                    fut.set_exception(exc)
            del fut, fn, args, kwargs
            with self._lock:
                if self._closed or self._idle >= self.keep:
                    self.alive -= 1
                    return
                self._idle += 1
            try:
                job = self._jobs.get(timeout=self.idle_s)
            except Empty:
                with self._lock:  # a job promised to us may have been put just now
                    try:
                        job = self._jobs.get_nowait()
                    except Empty:
                        self._idle -= 1
                        self.alive -= 1
                        return
        with self._lock:  # woken by shutdown
            self.alive -= 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            for _ in range(self._idle):
                self._jobs.put(None)
            self._idle = 0


@dataclass(frozen=True)
class _Watch:
    """The call holding the baton, for the watchdog: when it started holding, how long
    it held it before, and its limit."""

    request_id: str
    function: str
    since: float  # time.monotonic() when it took the baton
    used: float  # seconds it held the baton before
    limit: float
    started: float  # time.time() of the start of its run


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
        allow_modules: tuple[str, ...] = (),
        share_period: float = 0.02,
        take_batch: int = 16,
        result_ttl: int = 0,
        error_ttl: int = 300,
        max_result_bytes: int | None = None,
        shutdown_grace: float = 30.0,
        max_stack: int = 100_000,
        max_runtime: float | None = None,
        restart: Callable[[], None] | None = None,
    ) -> None:
        self.id = worker_id or new_process_id("worker")
        self.pool = pool
        # One connection for every command of this process (they wait for it in turn),
        # one for the blocking take and one for the inbox: a fixed number, so a large
        # grid neither grows its connections under load nor re-opens them.
        self.runtime = Runtime(
            url, namespace=namespace, process_id=self.id, max_connections=COMMAND_CONNECTIONS
        )
        self.keys = self.runtime.keys
        self.imports = imports
        self.auto_import = auto_import
        self.main_path = main_path
        self.policy = loading.ImportPolicy(
            (*imports, *allow_modules),
            script_dir=os.path.dirname(os.path.abspath(main_path)) if main_path else None,
            auto_import=auto_import,
        )
        self.share_period = share_period
        self.take_batch = take_batch
        self.result_ttl = result_ttl
        self.error_ttl = error_ttl
        self.max_result_bytes = max_result_bytes or settings.max_result_bytes()
        self.shutdown_grace = shutdown_grace
        # (id, payload, careful): careful for suspects of an earlier worker death
        self.stack: list[tuple[str, bytes, bool]] = []
        self._careful: set[str] = set()
        self.max_stack = max_stack
        self.parked: dict[str, _Parked] = {}
        self.baton = Baton()
        self.threads = _Threads(settings.idle_threads(), settings.thread_idle_s())
        # default limit on the time one call holds the baton (0: none); @fn(max_runtime=)
        # overrides it per function
        self.max_runtime = settings.max_runtime() if max_runtime is None else max_runtime
        if self.max_runtime < 0:
            raise ConfigError(f"max_runtime {self.max_runtime}: give seconds > 0, or 0 for none")
        self._restart = restart or reexec
        self._limits: dict[str, float] = {}  # running request -> its limit (if any)
        self._used: dict[str, float] = {}  # running request -> seconds it held the baton
        self._watch: _Watch | None = None  # read by the watchdog thread
        self._handed_back: set[str] = set()  # parked requests requeued on shutdown
        self._names: dict[str, str] = {}  # request -> function, while its result is stored
        self._abnormal = False  # the loop ended by an error, not by stop()
        self.store_retries = settings.store_retries()
        self._transient_rounds = 0  # flushes in a row that failed with a transient error
        self.processed = 0
        self.running: dict[str, asyncio.Task[None]] = {}
        self.started = time.time()
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._fetch: asyncio.Task[Any] | None = None
        self._blocking: aioredis.Redis | None = None
        self._idle_marked = False
        self._taking = 0
        self._beats = 0
        self._holder: str | None = None
        self._completions: list[Any] = []  # flattened (id, envelope, ttl, started, summary)
        self._flusher: asyncio.Task[None] | None = None
        self._holder_fn: str | None = None
        self.cycle_check_after = 2.0  # seconds a request waits before cycle checks
        self.cycle_steps = 16  # bounded steps of one cycle search per round
        self.cycle_step_budget = STEP_BUDGET  # call-graph nodes and members one step reads
        self.cycle_step_target: float | None = 0.005  # seconds per step the budget aims at
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- setup ------------------------------------------------------------------
    def load_code(self) -> None:
        """Import the ``--import`` modules.  The client's script waits for a request."""
        for module in self.imports:
            importlib.import_module(module)

    def _function(
        self, name: str, fingerprint: str, load_script: bool = False
    ) -> GridFunction[..., Any]:
        if load_script and self.main_path:
            loading.load_main_script(self.main_path)
        gf = calls_mod.lookup(name)
        module = name.partition(":")[0]
        if gf is None and module == "__main__":
            gf = self._script_function(name)
        elif gf is None:
            self._import_for(name, module)
            gf = calls_mod.lookup(name)
        if gf is None:
            raise _RefusedRequest(
                "unknown function",
                f"{name} is not a registered grid function on worker {self.id} (pool "
                f"{self.pool!r}); start the worker with `--import {module}` "
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

    async def _function_loaded(
        self, name: str, fingerprint: str, args_bytes: bytes = b""
    ) -> GridFunction[..., Any]:
        """``_function``, importing in a thread when it must: a slow import (a script's
        top level, a heavy package) holds the baton but must not stop the heartbeat.

        Arguments naming a class of the client's script (``__main__:Point``) need the
        script loaded to decode, whichever module the function comes from.
        """
        script = (
            self.main_path is not None
            and b"__main__:" in args_bytes
            and "__mp_main__" not in sys.modules
        )
        if calls_mod.lookup(name) is not None and not script:
            return self._function(name, fingerprint)
        assert self.loop is not None
        return await self.loop.run_in_executor(
            self.threads, self._function, name, fingerprint, script
        )

    def _import_for(self, name: str, module: str) -> None:
        """Import the module a request names, if this worker may (see ``loading``)."""
        try:
            self.policy.import_for_request(module)
        except loading.ImportRefused as exc:
            log.warning("refused to import %r for %s: %s", module, name, exc)
            raise _RefusedRequest(
                "import refused",
                f"worker {self.id} cannot import module {module!r} for {name}: {exc}",
            ) from None
        except ImportError as exc:
            raise _RefusedRequest(
                "unknown function",
                f"worker {self.id} cannot import module {module!r} for {name}: {exc}. "
                "Make the module importable on the workers (same code, same sys.path)",
            ) from None
        except Exception:
            raise  # the module's own error: the caller gets its type and traceback
        except BaseException as exc:  # SystemExit and the like from the module's top level
            raise _RefusedRequest(
                "import failed",
                f"importing {module!r} for {name} on worker {self.id} raised "
                f"{type(exc).__name__}: {exc}",
            ) from None

    def _script_function(self, name: str) -> GridFunction[..., Any]:
        """A function of the client's script: load the script on first use."""
        if not self.main_path:
            raise _RefusedRequest(
                "unknown function",
                f"{name} is defined in the caller's __main__, and worker {self.id} was not "
                "given the caller's script (--main-path). Move the function into a module "
                "and start the worker with `--import MODULE`",
            )
        state = loading.load_main_script(self.main_path)
        gf = calls_mod.lookup(name)
        if gf is None:
            raise _RefusedRequest("unknown function", state.explain_missing(name))
        return gf

    # -- main loop ------------------------------------------------------------
    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.load_code()
        self.runtime.beat_hooks.append(self._register)
        self.runtime.on_server_restart.append(self._after_server_restart)
        await self.runtime.start()
        self._blocking = await connect_redis(self.runtime.url, max_connections=1)
        background = [
            asyncio.create_task(self._share_loop(), name="pygirder-share"),
            asyncio.create_task(self._reap_loop(), name="pygirder-reaper"),
            asyncio.create_task(self._cycle_loop(), name="pygirder-cycles"),
        ]
        watchdog = threading.Thread(target=self._watchdog, name="pygirder-watchdog", daemon=True)
        watchdog.start()
        log.info("worker %s serving pool %r", self.id, self.pool)
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

    async def _after_server_restart(self) -> None:
        """A fresh server has forgotten our idle mark: set it again when next idle."""
        self._idle_marked = False

    async def _register(self) -> None:
        """Publish who we are and what we do; runs at every heartbeat."""
        assert self.runtime.redis is not None
        current = self._holder
        info = {
            "id": self.id, "host": socket.gethostname(), "pid": os.getpid(), "pool": self.pool,
            "started": self.started, "beat": time.time(), "processed": self.processed,
            "running": len(self.running), "parked": len(self.parked), "stack": len(self.stack),
            "current": current, "current_fn": self._holder_fn,
            "state": "busy" if self.baton.held or self.stack else "idle",
        }  # fmt: skip
        await self.runtime.redis.hset(self.keys.workers, self.id, json.dumps(info))
        self._beats += 1
        if self._beats % 4 == 0:
            await self._reconcile_inflight()

    async def _schedule(self) -> None:
        while not self._stopping.is_set():
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

    def _hold(self, request_id: str | None, function: str | None = None) -> None:
        """Remember which request holds the baton (shown by `pygirder status`), and
        account the time each request holds it for the watchdog."""
        now = time.monotonic()
        watch = self._watch
        if watch is not None:
            self._used[watch.request_id] = watch.used + (now - watch.since)
        self._holder, self._holder_fn = request_id, function
        limit = self._limits.get(request_id) if request_id is not None else None
        if request_id is None or not limit:
            self._watch = None
        else:
            self._watch = _Watch(request_id, function or "?", now, self._used.get(request_id, 0.0),
                                 limit, time.time())  # fmt: skip

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
        self._limits.pop(request_id, None)
        self._used.pop(request_id, None)
        self._handed_back.discard(request_id)

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
                await self._take(moved)  # bytes: a junk id need not be valid UTF-8
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

    async def _take(self, moved: bytes | None = None) -> int:
        self._taking += 1
        try:
            return await self._take_once(moved)
        finally:
            self._taking -= 1

    async def _take_once(self, moved: bytes | None) -> int:
        args: list[Any] = [self.keys.prefix, self.pool, self.id, self.take_batch]
        if moved is not None:
            args.append(moved)
        reply = await self.runtime.script("take", args)
        if reply:
            self._idle_marked = False  # the script cleared our idle mark
        items = []
        for i in range(0, len(reply), 3):
            raw = reply[i]
            try:
                request_id = raw.decode()
            except UnicodeDecodeError as exc:
                await self._drop_junk_id(raw, reply[i + 1], exc)
                continue
            items.append((request_id, reply[i + 1], reply[i + 2] != b"0"))
        self.stack.extend(reversed(items))
        return len(items)

    async def _drop_junk_id(self, raw: bytes, payload: bytes, exc: Exception) -> None:
        """An id that is not text was never made by pygirder: dead-letter it and forget it
        (put back on the queue, it would come back again and again)."""
        assert self.runtime.redis is not None
        await self._dead_letter(f"<undecodable id {raw[:64].hex()}>", payload, exc)
        prefix = self.keys.prefix.encode()
        async with self.runtime.redis.pipeline(transaction=True) as pipe:
            pipe.lrem(self.keys.inflight(self.id), 0, raw)
            pipe.delete(prefix + b"st:" + raw)
            await pipe.execute()

    # -- running one request ----------------------------------------------------
    async def _execute(self, request_id: str, payload: bytes) -> None:
        name = "?"
        ttl = self.result_ttl
        started = time.time()
        summary = ""
        try:
            try:
                try:
                    name, fingerprint, args_bytes = codec.decode(payload, path="request payload")
                except (CodecError, ValueError, TypeError) as exc:
                    await self._dead_letter(request_id, payload, exc)
                    raise _RefusedRequest(
                        "undecodable request", f"request {request_id}: {exc}"
                    ) from None
                gf = await self._function_loaded(name, fingerprint, args_bytes)
                arguments = codec.decode(args_bytes, path=f"{name} arguments")
                args, kwargs = gf.bind_payload(arguments)
                ctx = RequestContext(self, request_id, name)
                current_request.set(ctx)  # this task's own context
                limit = gf.max_runtime or self.max_runtime
                if limit:
                    self._limits[request_id] = limit
                self._hold(request_id, name)
                if request_id in self._careful:
                    await self._mark_current(request_id)
                if gf.is_async:
                    value = await _guarded_async(gf.func(*args, **kwargs))
                else:
                    run = functools.partial(gf.func, *args, **kwargs)
                    value = await self.loop.run_in_executor(  # type: ignore[union-attr]
                        self.threads, contextvars.copy_context().run, _guarded, run
                    )
                envelope = encode_ok(
                    value, name=name, limit=self.max_result_bytes, request_id=request_id
                )
                summary = summarize(value)
            except _RefusedRequest as exc:
                log.warning("refused %s: %s", request_id, exc)
                envelope = encode_error(RemoteError(exc.kind, str(exc), "", []))
                ttl = self.error_ttl
                summary = f"{exc.kind}: {exc}"[:200]
            except HandedBack:
                return  # requeued for another worker: this run's outcome must not count
            except Exception as exc:
                if request_id in self._handed_back:
                    return  # user code turned the hand-back into an error of its own
                cause = exc.original if isinstance(exc, _UserExit) else exc
                error = describe_exception(cause, request_id, name)
                envelope = encode_error(error)
                ttl = self.error_ttl
                summary = f"{error.remote_type}: {error.message}"[:200]
        finally:
            if request_id in self._careful:
                await self._mark_current(None)
            self._hold(None)
            self.baton.release()
            self._wake.set()
        if request_id in self._handed_back:
            return  # it returned after all, but it is queued again: the rerun answers
        self.processed += 1
        self.runtime.resolve(request_id, envelope)  # local waiters need not wait for the inbox
        self._names[request_id] = name
        self._completions.extend((request_id, envelope, ttl, started, summary))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_completions())

    async def _flush_completions(self) -> None:
        """Send finished results, batching those that finish while a send is in flight.

        Under load this turns one round trip per call into one per batch; when calls
        are rare each still goes out at once.
        """
        while self._completions:
            batch = self._completions[: 5 * 64]
            del self._completions[: 5 * 64]
            await self._store(batch)

    async def _store(self, batch: list[Any]) -> None:
        """Store a batch of results so that none is dropped: a request whose result is
        lost would stay `running` under a live worker, where no reaper helps.

        A failing batch is retried with backoff (a BUSY server, a lost connection), then
        split in halves (a batch over the server's limits); a result that still cannot
        be stored (out of memory) is replaced by a small error that says why; when even
        that fails the request is handed back to its queue.  With the server unreachable
        throughout, the batch stays pending and is tried again.
        """
        try:
            await self._complete(batch, retries=self.store_retries)
            self._transient_rounds = 0
            return
        except Exception as exc:
            error = exc
        # The server busy or away: keep the results and try later, for a while (a
        # timeout can also come from the batch itself, such as a huge result).
        if _transient(error) and self._transient_rounds < 10:
            self._transient_rounds += 1
            log.error("could not store %d results (%s); retrying", len(batch) // 5, error)
            self._completions[0:0] = batch
            await asyncio.sleep(1.0)
            return
        self._transient_rounds = 0
        if len(batch) > 5:
            half = (len(batch) // 10) * 5
            for part in (batch[:half], batch[half:]):
                try:
                    await self._complete(part, retries=1)
                except Exception:
                    await self._store_each(part)
            return
        await self._store_each(batch, error)

    async def _store_each(self, batch: list[Any], error: Exception | None = None) -> None:
        for i in range(0, len(batch), 5):
            request_id, envelope, _ttl, started, _summary = batch[i : i + 5]
            if error is None or i > 0:
                try:
                    await self._complete(batch[i : i + 5], retries=1)
                    continue
                except Exception as exc:
                    error = exc
            if _transient(error) and self._transient_rounds < 10:
                self._transient_rounds += 1
                self._completions.extend(batch[i : i + 5])
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
            small = [request_id, encode_error(failure), self.error_ttl, started,
                     f"ResultNotStored: {error}"[:200]]  # fmt: skip
            try:
                await self._complete(small, retries=self.store_retries)
                continue
            except Exception as exc:
                log.error("could not store an error for %s either (%s): handing it back",
                          request_id, exc)  # fmt: skip
            try:
                await self.runtime.script("requeue", [self.keys.prefix, self.id, 0, 0, request_id])
                self._names.pop(request_id, None)
            except Exception as exc:  # server unreachable: keep it, try again later
                log.error("could not hand back %s (%s); retrying", request_id, exc)
                self._completions.extend(small)
                await asyncio.sleep(1.0)

    async def _complete(self, batch: list[Any], *, retries: int) -> None:
        delay = 0.05
        for attempt in range(retries):
            try:
                await self.runtime.script(
                    "complete", [self.keys.prefix, self.id, INLINE_RESULT_LIMIT, *batch]
                )
                break
            except Exception as exc:
                if attempt + 1 >= retries:
                    raise
                log.warning("storing %d results failed (%s); retrying in %.2fs",
                            len(batch) // 5, exc, delay)  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 4)
        for i in range(0, len(batch), 5):
            self._names.pop(batch[i], None)

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
        futures, new_local, shared = await self.runtime.submit(
            calls, owner=self.id, local_pool=self.pool, parent=ctx.request_id
        )
        if new_local:
            self.stack.extend((rid, payload, False) for rid, payload in reversed(new_local))
            if len(self.stack) > self.max_stack:
                await self._share(len(self.stack) - self.max_stack, force=True)
        if all(f.done() for f in futures):  # all memoized: keep the baton, no context switch
            return [decode_envelope(f.result(), c.id) for f, c in zip(futures, calls, strict=True)]
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        parked = _Parked(
            children=shared,  # a new request cannot reach us: only shared ones can cycle
            since=now, cycle=loop.create_future(), next_check=now + self.cycle_check_after,
        )  # fmt: skip
        self.parked[ctx.request_id] = parked
        careful = ctx.request_id in self._careful
        if careful:
            await self._mark_current(None)
        self._hold(None)
        self.baton.release()
        self._wake.set()
        waiter = asyncio.ensure_future(self.runtime.wait(futures, calls, timeout))
        try:
            await asyncio.wait({waiter, parked.cycle}, return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                waiter.cancel()
                exc = parked.cycle.exception() or parked.cycle.result()
                raise exc
            return waiter.result()
        finally:
            self.parked.pop(ctx.request_id, None)
            await self.baton.acquire(high=True)
            self._hold(ctx.request_id, ctx.function)
            if careful:
                await self._mark_current(ctx.request_id)

    def wait_from_thread(
        self, calls: list[Call[Any]], ctx: RequestContext, timeout: float | None
    ) -> list[Any]:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(
            self.gather(calls, ctx, timeout), self.loop
        ).result()

    async def _cycle_loop(self) -> None:
        """Look for cycles among requests that have waited a while.

        A search walks the pending part of the call graph on the server, so it is
        rationed: only requests waiting on calls that were already pending elsewhere,
        at most a few per round, longest-waiting first, each round a few bounded steps
        of each search (a large graph takes several rounds, and no step holds the
        server for long).  A search that ends without a cycle is run again after twice
        the time the request has waited.  A real cycle never resolves, so it is found
        in the end.
        """
        while True:
            await asyncio.sleep(self.cycle_check_after / 2)
            now = time.monotonic()
            due = sorted(
                (p.since, rid) for rid, p in self.parked.items()
                if p.children and not p.cycle.done()
                and (p.search is not None or now >= p.next_check)
            )  # fmt: skip
            for _, request_id in due[:4]:
                parked = self.parked.get(request_id)
                if parked is None:
                    continue
                try:
                    await self._check_cycle(request_id, parked)
                except Exception as exc:
                    parked.search = None
                    parked.next_check = now + 2 * (now - parked.since)
                    log.warning("cycle check of %s failed: %s", request_id, exc)

    async def _check_cycle(self, request_id: str, parked: _Parked) -> None:
        """Advance the request's cycle search by up to ``cycle_steps`` bounded steps."""
        assert self.runtime.redis is not None
        if parked.search is None:
            parked.search = CycleSearch(
                request_id, parked.children, step_budget=self.cycle_step_budget,
                target_s=self.cycle_step_target,
            )  # fmt: skip
        search = parked.search
        ids: list[str] | None = None
        for _ in range(self.cycle_steps):
            ids = await search.step(self.runtime.script, self.keys.prefix)
            if ids or search.done:
                break
        if ids is None and not search.done:
            return  # out of steps for this round: no answer yet, continued next round
        parked.search = None
        if ids is None:
            if search.gave_up:
                log.warning(
                    "cycle search of %s stopped after %d pending calls; trying again later",
                    request_id, len(search.parent),
                )  # fmt: skip
            now = time.monotonic()
            parked.next_check = now + 2 * (now - parked.since)
            return
        names = []
        for i in ids:
            fn = await self.runtime.redis.hget(self.keys.call(i), "fn")
            names.append(f"{fn.decode() if fn else '?'}[{i[:12]}]")
        if not parked.cycle.done():
            parked.cycle.set_result(GridCycleError(
                "cycle: " + " -> ".join(names) + " (each waits on the next)",
                cycle=tuple(ids),
            ))  # fmt: skip

    # -- sharing ----------------------------------------------------------------
    async def _share_loop(self) -> None:
        """Offer surplus work to the pool: half of what this worker would not get
        through in one period, and at least the oldest entry.  The period backs off (up
        to 8x) while nobody takes anything, and snaps back when an offer is taken."""
        last = self.processed
        period = self.share_period
        while True:
            await asyncio.sleep(period)
            recent, last = self.processed - last, self.processed
            if len(self.stack) < 2:
                period = self.share_period
                continue
            # Offer at least the oldest entry: in a depth-first stack it is the biggest
            # piece of work (nearest the root), so one entry can feed an idle worker for
            # long; the server moves offers only while some worker of the pool is idle.
            # At most a chunk per offer (the server moves it in one script call); an
            # idle worker takes a fair share of it, and the next period offers more.
            offer = min(scripts.SHARE_CHUNK, max(1, (len(self.stack) - recent) // 2))
            moved = await self._share(min(offer, len(self.stack) - 1))
            period = self.share_period if moved else min(2 * period, 8 * self.share_period)

    async def _share(self, count: int, *, force: bool = False) -> int:
        """Offer the ``count`` oldest stack entries to the pool (all of them if ``force``)."""
        candidates = self.stack[:count]
        del self.stack[:count]
        moved: set[bytes] = set()
        # forced, in chunks: one script call per chunk keeps the server free for everyone
        # else.  An offer (at most a chunk) is one call: the server weighs all of it
        # against the queue.
        step = scripts.SHARE_CHUNK if force else max(1, len(candidates))
        try:
            for start in range(0, len(candidates), step):
                reply = await self.runtime.script(
                    "share",
                    [self.keys.prefix, self.pool, self.id, "1" if force else "0",
                     *(rid for rid, _, _ in candidates[start : start + step])],
                )  # fmt: skip
                moved.update(reply)
        except Exception as exc:
            log.warning("sharing failed: %s", exc)
        finally:
            kept = [item for item in candidates if item[0].encode() not in moved]
            self.stack[0:0] = kept
            if kept:
                # the scheduler may have gone idle while these were out on offer
                self._wake.set()
        return len(moved)

    # -- liveness -------------------------------------------------------------------
    async def _reconcile_inflight(self) -> None:
        """Hand back in-flight entries we do not know about (a take whose reply was lost)."""
        if self._taking or self._fetch is not None:
            return
        assert self.runtime.redis is not None
        listed = await self.runtime.redis.lrange(self.keys.inflight(self.id), 0, -1)
        known = {rid.encode() for rid in self.running} | {rid.encode() for rid, _, _ in self.stack}
        strays = [i for i in listed if i not in known]
        if strays and not self._taking and self._fetch is None:
            await self._requeue_ids(strays)

    async def _reap_loop(self) -> None:
        """One worker at a time (a lock with a TTL) requeues the work of dead workers."""
        assert self.runtime.redis is not None
        redis = self.runtime.redis
        every = self.runtime.liveness.reap_every
        while True:
            await asyncio.sleep(every)
            try:
                got = await redis.set(self.keys.reaper_lock, self.id, nx=True, px=int(every * 3000))
                if not got:
                    holder = await redis.get(self.keys.reaper_lock)
                    if holder != self.id.encode():
                        continue
                    await redis.pexpire(self.keys.reaper_lock, int(every * 3000))
                await self.reap()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reaping failed: %s", exc)

    async def reap(self) -> list[str]:
        """Requeue the requests of every registered worker whose heartbeat has expired,
        then withdraw every dead client from what it waited for."""
        assert self.runtime.redis is not None
        dead = await self._reap_workers()
        await self.runtime.reap_waiters()
        return dead

    async def _reap_workers(self) -> list[str]:
        assert self.runtime.redis is not None
        redis = self.runtime.redis
        workers = await redis.hgetall(self.keys.workers)
        if not workers:
            return []
        ids = [w.decode() for w in workers]
        async with redis.pipeline(transaction=False) as pipe:
            for worker_id in ids:
                pipe.exists(self.keys.heartbeat(worker_id))
            alive = await pipe.execute()
        dead = [w for w, a in zip(ids, alive, strict=True) if not a and w != self.id]
        for worker_id in dead:
            await recovery.retire_dead_worker(
                redis, self.runtime.script, self.keys, worker_id,
                json.loads(workers[worker_id.encode()]),
                max_attempts=self.runtime.liveness.max_attempts, error_ttl=self.error_ttl,
            )  # fmt: skip
        return dead

    async def _requeue_ids(self, ids: list[str]) -> None:
        """Hand these requests back to their pools, a bounded chunk per script call."""
        for start in range(0, len(ids), scripts.REQUEUE_PAGE):
            chunk = ids[start : start + scripts.REQUEUE_PAGE]
            await self.runtime.script("requeue", [self.keys.prefix, self.id, 0, 0, *chunk])

    async def _requeue_all(self, worker_id: str, *, dead: bool) -> tuple[int, list[str]]:
        attempts = self.runtime.liveness.max_attempts
        return await recovery.requeue_all(
            self.runtime.script, self.keys, worker_id, dead=dead, max_attempts=attempts
        )

    async def _fail_poison(self, request_id: str, worker_id: str) -> None:
        await recovery.fail_poison(self.runtime.redis, self.runtime.script, self.keys, request_id,
                                   worker_id, max_attempts=self.runtime.liveness.max_attempts,
                                   error_ttl=self.error_ttl)  # fmt: skip

    # -- shutdown -----------------------------------------------------------------
    async def _shutdown(self, background: list[asyncio.Task[Any]]) -> None:
        try:
            await asyncio.wait_for(self._hand_back(), self.shutdown_grace + 10)
        except Exception as exc:  # server gone: the reaper requeues our work instead
            log.warning("could not hand back work on shutdown: %s", exc)
        finally:
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
        if self._abnormal:
            await self._hand_back_after_crash()
            return
        # Hand back what has not started and what waits on sub-calls (it can be re-run
        # anywhere); give the request that is computing time to finish.
        waiting = [request_id for request_id, _, _ in self.stack]
        self.stack.clear()
        parked = list(self.parked)
        if waiting or parked:
            await self._requeue_ids([*waiting, *parked])
        for request_id in parked:
            entry = self.parked.get(request_id)
            if entry is not None and not entry.cycle.done():
                self._handed_back.add(request_id)
                entry.cycle.set_exception(HandedBack())
        if self.running:
            await asyncio.wait(list(self.running.values()), timeout=self.shutdown_grace)
        if self._flusher is not None:
            await self._flusher
        await self._requeue_all(self.id, dead=False)
        async with redis.pipeline(transaction=False) as pipe:
            pipe.hdel(self.keys.idle(self.pool), self.id)
            pipe.hdel(self.keys.workers, self.id)
            await pipe.execute()

    async def _hand_back_after_crash(self) -> None:
        """The event loop is being torn down by an error outside any call's own code.

        What finished is stored; everything else is handed back as the reaper would for
        a dead worker, with the request that held the baton blamed: a request that ends
        its worker this way each time is failed as poison after PYGIRDER_MAX_ATTEMPTS,
        instead of being handed back for ever.
        """
        redis = self.runtime.redis
        assert redis is not None
        holder = self._holder
        log.error("worker %s is going down abnormally (holding %s); handing back its work",
                  self.id, holder)  # fmt: skip
        if self._completions:
            await self._flush_completions()
        if holder is not None:
            await redis.set(self.keys.current(self.id), holder)
        _, poisoned = await self._requeue_all(self.id, dead=True)
        for request_id in poisoned:
            await self._fail_poison(request_id, self.id)
        async with redis.pipeline(transaction=False) as pipe:
            pipe.hdel(self.keys.idle(self.pool), self.id)
            pipe.hdel(self.keys.workers, self.id)
            pipe.hincrby(self.keys.stats, "dead_workers", 1)
            await pipe.execute()

    # -- execution limit ------------------------------------------------------------
    def _watchdog(self) -> None:
        """Enforce max_runtime from a thread of its own: it sees an async call that
        blocks the event loop as well as a sync one spinning in its thread.

        Python cannot stop a running thread, so the process goes: the call is failed
        (not retried: a rerun would spin again), the rest of this process's work is
        handed back, and the process is replaced (see :func:`reexec`).
        """
        while True:
            watch = self._watch
            period = 0.1 if watch is None else min(0.1, watch.limit / 10)
            time.sleep(max(0.01, period))
            watch = self._watch
            if self.loop is not None and self.loop.is_closed():
                return
            if watch is None or self.loop is None:
                continue
            ran = watch.used + (time.monotonic() - watch.since)
            if ran > watch.limit and self._watch is watch:
                self._over_limit(watch, ran)
                return

    def _over_limit(self, watch: _Watch, ran: float) -> None:
        import redis as sync_redis

        log.error("%s [%s] ran %.1fs, over its max_runtime of %gs: failing it and restarting "
                  "worker %s", watch.function, watch.request_id, ran, watch.limit,
                  self.id)  # fmt: skip
        error = RemoteError(
            "pygirder.MaxRuntimeExceeded",
            f"{watch.function} ran for more than its max_runtime of {watch.limit:g} s and was "
            f"stopped (its worker process {self.id} was restarted). Raise "
            "@pygirder.fn(max_runtime=...) (or the worker's --max-runtime / "
            "PYGIRDER_MAX_RUNTIME) if it needs longer, or look for an endless loop",
            "",
            [CallLink(watch.request_id, watch.function)],
        )
        client = sync_redis.Redis.from_url(self.runtime.url, socket_timeout=10,
                                           socket_connect_timeout=5)  # fmt: skip
        try:
            client.register_script(scripts.COMPLETE)(args=[
                self.keys.prefix, self.id, INLINE_RESULT_LIMIT, watch.request_id,
                encode_error(error), self.error_ttl, watch.started,
                f"MaxRuntimeExceeded: over {watch.limit:g} s",
            ])  # fmt: skip
            # the rest of this process's work (its stack, parked and in-flight calls)
            requeue = client.register_script(scripts.REQUEUE)
            while requeue(args=[self.keys.prefix, self.id, 0, 0])[1]:
                pass  # a bounded page per call, until nothing is left
            client.hdel(self.keys.idle(self.pool), self.id)
        except Exception as exc:  # the reaper requeues whatever we could not hand back
            log.error("could not fail %s or hand back work: %s", watch.request_id, exc)
        finally:
            client.close()
        # The registration stays: anything taken between the hand-back and the restart
        # is requeued by the reaper once this id's heartbeat lapses.
        if self._stopping.is_set():  # told to stop: it was only finishing that call
            _flush_logs()
            os._exit(0)
        self._restart()


def _flush_logs() -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def reexec() -> None:
    """Replace this process by a fresh copy of itself (same pid, same command line), so
    `pygirder worker` comes back with or without a supervisor."""
    _flush_logs()
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    finally:
        os._exit(70)  # exec failed: exit and let a supervisor start us again


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
    worker = Worker(
        url, pool=pool, namespace=namespace, imports=imports, auto_import=auto_import,
        allow_modules=allow_modules,
        main_path=main_path, worker_id=worker_id, result_ttl=result_ttl,
        max_runtime=max_runtime,
    )  # fmt: skip

    handler = None
    if log_level:
        from ..observe.logs import install_grid_logging

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
