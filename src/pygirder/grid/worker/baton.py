"""The baton and the threads sync calls run in.

The event loop holds the worker's single baton: a request runs Python only while it
holds it and gives it up whenever it waits on sub-calls, so a worker never sits idle
behind a waiting request and re-entrant calls to any depth cannot deadlock.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from queue import Empty, SimpleQueue
from typing import Any


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


class Threads(Executor):
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
        self._start((fut, fn, args, kwargs, None))
        return fut

    def run_soon(
        self, loop: asyncio.AbstractEventLoop, fn: Callable[[], Any]
    ) -> asyncio.Future[Any]:
        """Run ``fn`` on a thread; its outcome settles the returned future of ``loop``.

        What ``run_in_executor`` does, without the ``concurrent.futures`` future (a
        lock and a condition each) and the two callbacks that chain it to the loop's:
        a sync grid call makes this trip once per run, so it is the worker's busiest
        hop.  The outcome comes back through one ``call_soon_threadsafe``."""
        fut: asyncio.Future[Any] = loop.create_future()
        self._start((None, fn, (), {}, (loop, fut)))
        return fut

    def _start(self, job: Any) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot run a call after the worker shut down")
            if self._idle:
                self._idle -= 1  # promised to one waiting thread
                self._jobs.put(job)
                return
            self._started += 1
            self.alive += 1
            name = f"{self.prefix}-{self._started}"
        threading.Thread(target=self._serve, args=(job,), name=name, daemon=True).start()

    def _serve(self, job: Any) -> None:
        while job is not None:
            fut, fn, args, kwargs, target = job
            job = None
            if target is not None:
                _run_for_loop(fn, *target)
            elif fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # handed to the waiter, as concurrent.futures does
                    fut.set_exception(exc)
            del fut, fn, args, kwargs, target
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


def _run_for_loop(
    fn: Callable[[], Any], loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any]
) -> None:
    """Run ``fn`` here and settle ``fut`` with its outcome on ``loop``'s thread."""
    try:
        outcome: tuple[bool, Any] = (True, fn())
    except BaseException as exc:  # handed to the waiter, as run_in_executor does
        outcome = (False, exc)
    try:
        loop.call_soon_threadsafe(_settle, fut, outcome)
    except RuntimeError:  # the loop is closed: nobody waits any more
        pass


def _settle(fut: asyncio.Future[Any], outcome: tuple[bool, Any]) -> None:
    if fut.done():  # its waiter was cancelled
        return
    ok, value = outcome
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)
