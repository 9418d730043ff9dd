"""The client side: ``pygirder.connect()`` and the ``Grid`` handle users hold.

The grid's async core runs on a private event loop in a background thread, so sync
code (``grid.run``, ``call.result()``) and asyncio code (``await grid.run_async``,
``await call``) share one implementation.  Without a URL, ``connect()`` also starts a
private Valkey server and local worker processes, and stops them on exit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from ..calls import Call, GridFunction
from ..errors import ConfigError, GridConnectionError, GridFunctionError, GridTimeout
from ..server import EmbeddedServer, random_password
from . import context
from .loading import stop_if_loading_script
from .protocol import Envelope, decode_envelope
from .restore import StoreOnlyAnswers
from .runtime import Runtime, new_process_id
from .supervisor import Supervisor

R = TypeVar("R")
_UNSET: Any = object()


class _LoopThread:
    """An event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="pygirder-client", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Any) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Any, timeout: float | None = None) -> Any:
        return self.submit(coro).result(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what still runs on the loop, let it unwind, then stop the loop.

        A task left pending when the loop stops is destroyed with its connections
        still open, which Python reports as unclosed sockets and transports.
        """

        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=timeout)

        if self.thread.is_alive():
            with contextlib.suppress(Exception):
                self.submit(drain()).result(timeout + 1)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


class GridFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """The future result of one submitted call: ``.result(timeout)``, ``.cancel()``."""

    def __init__(self, call: Call[Any]) -> None:
        super().__init__()
        self.call = call

    def __repr__(self) -> str:
        return f"<GridFuture {self.call!r} {self._state.lower()}>"


def _main_script() -> str | None:
    """The user's script file, when the program was started as `python script.py`."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or getattr(main, "__spec__", None) is not None:
        return None  # interactive, `python -m module` (importable anyway), or embedded
    path = os.path.abspath(path)
    return path if path.endswith(".py") and os.path.exists(path) else None


def _allowed_packages() -> list[str]:
    """Top-level packages of the grid functions registered so far (``__main__`` aside).

    Local workers may import these for a request, besides modules in the script's
    folder: a request naming any other module is refused, whoever sent it.
    """
    from ..calls import registered_names

    return sorted({n.partition(":")[0].split(".")[0] for n in registered_names()} - {"__main__"})


class Grid:
    """A connection to a grid, plus the private server and workers it started, if any."""

    def __init__(
        self,
        url: str | None = None,
        *,
        workers: int | None = None,
        namespace: str = "default",
        pool: str = "default",
        start_timeout: float = 60.0,
        store: str | os.PathLike[str] | None = _UNSET,
    ) -> None:
        if workers is not None and workers < 0:
            raise ConfigError(f"workers={workers!r}: must be 0 or more")
        from ..results import resolve_store

        # the durable result store of the local workers: resolved here, so a relative
        # folder means the same one whatever directory the workers start in
        self.store = resolve_store("off" if store is None else (None if store is _UNSET else store))
        self.namespace = namespace
        self.pool = pool
        self.start_timeout = start_timeout
        self._url = url
        self._n_workers = workers if workers is not None else (0 if url else os.cpu_count() or 1)
        self._server: EmbeddedServer | None = None
        self._supervisor: Supervisor | None = None
        self._monitor: threading.Thread | None = None
        self._log_dir: Path | None = None
        self._loop: _LoopThread | None = None
        self.runtime: Runtime | None = None
        self._answers: StoreOnlyAnswers | None = None
        self._closed = False

    # -- lifecycle --------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._url is None:
            raise GridConnectionError("the grid is not started; use it as `with connect() as grid`")
        return self._url

    def start(self) -> Grid:
        stop_if_loading_script()
        try:
            if self._url is None:
                # a random password: other local users cannot reach the loopback port
                self._server = EmbeddedServer(password=random_password()).start()
                self._url = self._server.url
            self._loop = _LoopThread()
            self.runtime = Runtime(
                self._url, namespace=self.namespace, process_id=new_process_id("client"),
                lean_scripts=True,
            )  # fmt: skip
            self._loop.run(self.runtime.start())
            if self._n_workers:
                self._start_workers(self._n_workers)
                self.wait_for_workers(self._n_workers, timeout=self.start_timeout)
            elif self._server is not None:
                # nothing but this client will ever see its private server: the store
                # answers its calls, and what it cannot answer fails at once
                from ..results import open_store

                store = open_store(self.store) if self.store is not None else None
                self._answers = StoreOnlyAnswers(self.runtime, store)
                self.runtime.answer_queued = self._answers
        except BaseException:
            self.close()
            raise
        context.push_default(self)
        return self

    def _start_workers(self, n: int) -> None:
        """Local worker processes, restarted when they die (as `pygirder worker` does)."""
        from .recovery import DeadChildRecovery
        from .supervisor import Supervisor

        self._log_dir = Path(tempfile.mkdtemp(prefix="pygirder-workers-"))
        cmd = [
            sys.executable, "-m", "pygirder", "worker",
            "--namespace", self.namespace, "--pool", self.pool, "--processes", "1",
        ]  # fmt: skip
        main = _main_script()
        if main:
            cmd += ["--main-path", main]
        for package in _allowed_packages():
            cmd += ["--allow-module", package]
        env = dict(os.environ)
        env["PYGIRDER_REDIS"] = self.url  # not in argv, where `ps` shows the password
        env["PYGIRDER_STORE"] = self.store or "off"
        paths = [p for p in sys.path if p and os.path.isdir(p)]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([os.getcwd(), *paths]))
        log_dir = self._log_dir
        self._supervisor = Supervisor(
            cmd,
            n,
            env=env,
            output=lambda i: open(log_dir / f"worker-{i}.log", "ab"),  # noqa: SIM115 (closed by Supervisor)
            # with a private server gone there is nothing to hand work back to
            death_signal=signal.SIGKILL if self._server is not None else signal.SIGTERM,
            on_death=DeadChildRecovery(self.url, self.namespace),
        )
        self._supervisor.start()
        self._monitor = threading.Thread(target=self._watch_workers, daemon=True,
                                         name="pygirder-local-workers")  # fmt: skip
        self._monitor.start()

    def _watch_workers(self) -> None:
        while not self._closed and self._supervisor is not None:
            self._supervisor.poll()
            time.sleep(0.1)

    def add_workers(self, n: int = 1) -> None:
        """Start ``n`` more local worker processes."""
        if self.runtime is not None:
            self.runtime.answer_queued = None  # the workers run what the store cannot answer
        if self._supervisor is None:
            self._start_workers(n)
        else:
            self._supervisor.add(n)

    def worker_pids(self) -> list[int]:
        """Process ids of the live local workers this grid started."""
        return self._supervisor.pids() if self._supervisor is not None else []

    def wait_for_workers(self, n: int, timeout: float = 60.0) -> None:
        """Block until ``n`` workers have registered in this grid's namespace."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self.workers()) >= n:
                return
            if self._supervisor is not None and self._supervisor.restarts:
                raise GridConnectionError(
                    "a local worker exited while starting; its log ends with:\n"
                    + self._worker_log_tail(0)
                )
            if time.monotonic() > deadline:
                raise GridTimeout(
                    f"only {len(self.workers())} of {n} workers started in {timeout}s"
                )
            time.sleep(0.02)

    def _worker_log_tail(self, i: int) -> str:
        if self._log_dir is None:
            return ""
        path = self._log_dir / f"worker-{i}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def workers(self) -> dict[str, dict[str, Any]]:
        """The workers registered in this namespace, by id."""
        rt = self._require()
        raw = self._call(rt.redis.hgetall(rt.keys.workers))  # type: ignore[union-attr]
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def stats(self) -> dict[str, int]:
        """Grid-wide counters: submitted, executed, cached, shared, moved_to_pool, requeued."""
        rt = self._require()
        raw = self._call(rt.redis.hgetall(rt.keys.stats))  # type: ignore[union-attr]
        return {k.decode(): int(v) for k, v in raw.items()}

    def gc(self, older_than: float, *, dry_run: bool = False) -> Any:
        """Drop results, call graph and abandoned requests idle for ``older_than`` seconds."""
        import redis

        from .maintenance import collect_garbage

        client = redis.Redis.from_url(self.url)
        try:
            return collect_garbage(client, self.namespace, older_than, dry_run=dry_run)
        finally:
            client.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        context.pop_default(self)
        if self.runtime is not None and self._loop is not None:
            if self._answers is not None:
                with contextlib.suppress(Exception):
                    self._loop.run(self._answers.close(), timeout=10)
            try:
                self._loop.run(self.runtime.close(), timeout=10)
            except Exception:
                pass
        if self._supervisor is not None:
            self._supervisor.stop(timeout=10)
        if self._monitor is not None:
            self._monitor.join(2)
        if self._loop is not None:
            self._loop.stop()
        if self._server is not None:
            self._server.stop()
        if self._log_dir is not None:
            import shutil

            shutil.rmtree(self._log_dir, ignore_errors=True)

    def __enter__(self) -> Grid:
        return self if self.runtime is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require(self) -> Runtime:
        if self.runtime is None or self._closed:
            raise GridConnectionError("this grid is closed; open a new one with pygirder.connect()")
        return self.runtime

    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        assert self._loop is not None
        return self._loop.run(coro, timeout)

    # -- sync API ---------------------------------------------------------------
    async def _gather(self, calls: list[Call[Any]], timeout: float | None) -> list[Any]:
        rt = self._require()
        futures, _, _ = await rt.submit(calls, local_pool=self.pool)
        return await rt.wait(futures, calls, timeout)

    def run(self, call: Call[R], timeout: float | None = None) -> R:
        """Run one call on the grid and return its result (memoized grid-wide)."""
        return self.wait([call], timeout=timeout)[0]

    def wait(self, calls: Iterable[Call[Any]], timeout: float | None = None) -> list[Any]:
        """Results of several calls, in order; they run in parallel."""
        checked = context._check_calls(calls)
        self._require()
        fut = self._loop.submit(self._gather(checked, timeout))  # type: ignore[union-attr]
        try:
            return fut.result()
        except KeyboardInterrupt:
            fut.cancel()
            raise

    def submit(self, call: Call[R]) -> GridFuture:
        """Start a call and return at once; the future resolves when it finishes."""
        [call] = context._check_calls([call])
        rt = self._require()
        result = GridFuture(call)

        async def go() -> None:
            futures, _, _ = await rt.submit([call], local_pool=self.pool)
            try:
                data = await asyncio.shield(futures[0])
            except asyncio.CancelledError:
                return
            if result.set_running_or_notify_cancel():
                try:
                    result.set_result(decode_envelope(data, call.id))
                except Exception as exc:
                    result.set_exception(exc)

        inner = self._loop.submit(go())  # type: ignore[union-attr]

        def on_inner_done(f: concurrent.futures.Future[Any]) -> None:
            if not f.cancelled() and f.exception() is not None and not result.done():
                result.set_exception(f.exception())

        inner.add_done_callback(on_inner_done)

        def on_result_done(r: concurrent.futures.Future[Any]) -> None:
            if r.cancelled():
                inner.cancel()
                self._loop.submit(rt.cancel([call.id]))  # type: ignore[union-attr]

        result.add_done_callback(on_result_done)
        return result

    def as_completed(
        self, calls: Iterable[Call[Any]], timeout: float | None = None
    ) -> Iterator[GridFuture]:
        """Futures of the calls, yielded as they finish."""
        futures = [self.submit(c) for c in calls]
        yield from concurrent.futures.as_completed(futures, timeout=timeout)  # type: ignore[misc]

    def map(
        self,
        fn: GridFunction[..., R],
        args: Iterable[tuple[Any, ...]],
        *,
        progress: bool = False,
        timeout: float | None = None,
        window: int = 10_000,
    ) -> list[R]:
        """``fn(*a)`` for every tuple ``a``, in parallel; results in argument order.

        At most ``window`` calls are outstanding at once, so arguments are consumed
        lazily from the iterable.
        """
        if not isinstance(fn, GridFunction):
            raise GridFunctionError(
                f"grid.map needs a grid function, got {fn!r}; decorate it with @pygirder.fn"
            )
        total = len(args) if hasattr(args, "__len__") else None  # type: ignore[arg-type]
        if not progress:
            return self._run_map(fn, args, window, timeout, None)
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>8.0f} calls/s"), TimeElapsedColumn(),
            TimeRemainingColumn(),
        )  # fmt: skip
        with Progress(*columns, transient=False) as bar:
            task = bar.add_task(fn.name, total=total, rate=0.0)
            start = time.perf_counter()
            done = itertools.count(1)

            def tick() -> None:
                n = next(done)
                if n % 64 == 0 or n == total:
                    elapsed = time.perf_counter() - start
                    bar.update(task, completed=n, rate=n / elapsed if elapsed else 0.0)

            return self._run_map(fn, args, window, timeout, tick)

    def _run_map(
        self,
        fn: GridFunction[..., R],
        args: Iterable[tuple[Any, ...]],
        window: int,
        timeout: float | None,
        tick: Callable[[], None] | None,
    ) -> list[R]:
        """Run ``_map`` on the loop; on Ctrl-C stop it and wait (briefly) until what it
        submitted and nobody needs any more is cancelled on the grid."""
        self._require()
        withdrawn: concurrent.futures.Future[None] = concurrent.futures.Future()
        fut = self._loop.submit(  # type: ignore[union-attr]
            self._map(fn, args, window, timeout, tick, withdrawn)
        )
        try:
            return fut.result()
        except KeyboardInterrupt:
            fut.cancel()
            try:
                withdrawn.result(timeout=5)
            except Exception:
                pass
            raise

    async def _map(
        self,
        fn: GridFunction[..., R],
        args: Iterable[tuple[Any, ...]],
        window: int,
        timeout: float | None,
        tick: Callable[[], None] | None,
        withdrawn: concurrent.futures.Future[None] | None = None,
    ) -> list[R]:
        """Submit lazily within the window, then wait for everything.

        If the map does not finish (time-out, cancellation, a bad argument half-way),
        what it submitted and nobody else in this process waits for is cancelled on
        the grid, which drops the calls that have not started, and this process lets
        go of their payloads.
        """
        rt = self._require()
        slots = asyncio.Semaphore(max(1, window))
        futures: list[asyncio.Future[Envelope]] = []
        ids: list[str] = []

        def release(_f: asyncio.Future[Envelope]) -> None:
            slots.release()
            if tick is not None:
                tick()

        iterator = iter(args)
        index = 0
        finished = False
        try:
            async with asyncio.timeout(timeout):
                while True:
                    # a chunk never exceeds the window, or its slots could never all be
                    # acquired
                    chunk = list(itertools.islice(iterator, min(512, max(1, window))))
                    if not chunk:
                        break
                    calls = []
                    for item in chunk:
                        if not isinstance(item, tuple | list):
                            raise GridFunctionError(
                                f"grid.map argument {index} is {type(item).__name__} "
                                f"{item!r:.40}, not a tuple of positional arguments; write "
                                f"[({item!r:.20},), ...] for one-argument functions"
                            )
                        calls.append(fn(*item))
                        index += 1
                    for _ in calls:
                        await slots.acquire()
                    submitted, _, _ = await rt.submit(calls, local_pool=self.pool)
                    rt.hold([c.id for c in calls], submitted)
                    ids.extend(c.id for c in calls)
                    for f in submitted:
                        f.add_done_callback(release)
                    futures.extend(submitted)
                pending = [f for f in futures if not f.done()]
                if pending:
                    await asyncio.wait(pending)
            finished = True
        except TimeoutError as exc:
            if isinstance(exc, GridTimeout):
                raise
            still = sum(1 for f in futures if not f.done())
            raise GridTimeout(
                f"{still} of {len(futures)} submitted {fn.name} calls did not finish in "
                f"{timeout}s; those not yet started were cancelled, started ones run to the "
                "end and their results are memoized",
                call_ids=tuple(i for i, f in zip(ids, futures, strict=True) if not f.done()),
            ) from None
        finally:
            try:
                if not finished:
                    await asyncio.shield(rt.let_go(ids, futures))
                else:
                    rt.let_go_local(ids)
            finally:
                if withdrawn is not None and not withdrawn.done():
                    withdrawn.set_result(None)
        return [decode_envelope(f.result(), i) for f, i in zip(futures, ids, strict=True)]

    # -- async twins --------------------------------------------------------------
    async def _bridge(self, coro: Any) -> Any:
        self._require()
        return await asyncio.wrap_future(self._loop.submit(coro))  # type: ignore[union-attr]

    async def run_async(self, call: Call[R], timeout: float | None = None) -> R:
        return (await self.gather_async([call], timeout=timeout))[0]

    async def gather_async(
        self, calls: Iterable[Call[Any]], timeout: float | None = None
    ) -> list[Any]:
        return await self._bridge(self._gather(context._check_calls(calls), timeout))

    async def map_async(
        self,
        fn: GridFunction[..., R],
        args: Iterable[tuple[Any, ...]],
        *,
        timeout: float | None = None,
        window: int = 10_000,
    ) -> list[R]:
        return await self._bridge(self._map(fn, args, window, timeout, None))

    async def as_completed_async(self, calls: Iterable[Call[Any]]) -> AsyncIterator[GridFuture]:
        """Futures of the calls, yielded as they finish (already done when yielded)."""
        wrapped = {asyncio.wrap_future(f): f for f in (self.submit(c) for c in calls)}
        pending = set(wrapped)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                yield wrapped[fut]


def connect(
    url: str | None = None,
    *,
    workers: int | None = None,
    namespace: str = "default",
    pool: str = "default",
    start_timeout: float = 60.0,
    store: str | os.PathLike[str] | None = _UNSET,
) -> Grid:
    """Open a grid.  No URL: a private Valkey plus ``workers`` local worker processes
    (default: one per core).  With a URL: connect to that server (Redis 7+/Valkey;
    ``redis://user:password@host:port/db`` or ``rediss://`` for TLS).

    ``store`` is the durable result store of the local workers: results outlive the
    grid there, and a call it holds is answered without running.  Default:
    ``PYGIRDER_STORE``, else a folder in the user's cache folder (see
    :func:`pygirder.results.default_location`); a folder, ``s3://bucket/prefix``, or
    None to turn it off.  Workers started elsewhere have their own ``--store``.  A
    private grid with ``workers=0`` runs nothing: the store answers its calls, and a
    call it cannot answer raises :class:`pygirder.NotStored` at once (until
    ``add_workers``).
    """
    if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(
            f"url={url!r}: expected redis://host:port/db, rediss:// (TLS) or unix:// "
            "(leave it out for a private local grid)"
        )
    return Grid(
        url, workers=workers, namespace=namespace, pool=pool, start_timeout=start_timeout,
        store=store,
    ).start()  # fmt: skip
