"""Where a sync call runs: inline on the event loop's thread when it is known to be short.

Handing a call to a thread and its result back through the loop's self-pipe costs more
than an empty call, so a sync function whose last runs in this process were short
(under ``PYGIRDER_INLINE_S``) runs inline, on the loop's own thread.  Its first run is
always on a thread, which measures it.  The loop is stopped while a call runs inline,
so every way out is guarded:

- a run that takes longer than the limit sends the function back to threads, until
  twice as many short runs in a row as last time (a machine that stalled a run for a
  moment costs little; a function that turned slow stays on threads);
- a run that needs the loop (``pygirder.wait``, ``call.result()``) is aborted with
  :class:`Reroute`, a ``BaseException`` of this module that user code cannot raise,
  and re-run on a thread (grid functions are pure; the aborted run published
  nothing, since only a wait reaches the grid); the function never runs inline again;
- a run still going after ``abort_after`` seconds is aborted the same way by the
  watchdog thread (an asynchronous exception in the loop's thread), so a formerly
  fast function that now loops stops the heartbeat for a fraction of a second, not
  for good.  Code blocked in C (a ``time.sleep``, a long numpy operation, a blocking
  read), where that exception cannot land, is left to finish: its result counts, the
  watchdog thread keeps this process's heartbeat alive meanwhile (so peers do not
  declare the worker dead and run the call again), a warning names the function, and
  the function goes back to threads.  Once the run is seen back in Python code it is
  aborted as above;
- what user code raises comes back as on a thread: ``Exception`` as is, any other
  ``BaseException`` (``SystemExit``...) wrapped in :class:`UserExit`.

``max_runtime`` is enforced as for threaded runs: the watchdog thread sees the call
holding the baton either way.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ... import settings
from ...calls import GridFunction

log = logging.getLogger("pygirder.worker")

# Names in a function's code that may be a wait on sub-calls (``call.result()``,
# ``pygirder.wait``): such a function never runs inline.
WAIT_NAMES = frozenset({"result", "wait"})


class UserExit(Exception):
    """Carries a BaseException raised by user code (``sys.exit()``, ``KeyboardInterrupt``,
    ``GeneratorExit``...) out of it as an ordinary error, so it fails the call and never
    reaches the event loop, which would stop the worker."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(repr(original))
        self.original = original


class Reroute(BaseException):
    """Raised inside a call running inline that must run on a thread instead."""


def guarded(run: Callable[[], Any]) -> Any:
    """Run sync user code in its thread; what it raises comes back as an Exception.

    A BaseException set on the executor's future would be re-raised inside the event
    loop's task, and asyncio lets SystemExit and KeyboardInterrupt end the loop.
    """
    try:
        return run()
    except Exception:
        raise
    except BaseException as exc:
        raise UserExit(exc) from None


def _set_async_exc(thread: int, exc: type[BaseException] | None) -> None:
    """Raise ``exc`` in ``thread`` at its next bytecode boundary; None withdraws one
    not yet raised."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread), None if exc is None else ctypes.py_object(exc)
    )


class _Run:
    """The call running inline, shared with the watchdog thread under ``Inline._lock``."""

    __slots__ = ("aborted", "blocked", "frame", "lasti", "needs_loop", "since", "thread")

    def __init__(self, thread: int) -> None:
        self.thread = thread
        self.since = time.monotonic()  # for the watchdog: the run's start, near enough
        self.aborted = False  # the watchdog raised Reroute in it
        self.needs_loop = False  # it asked for the loop (a wait)
        # the Reroute did not land: blocked in C, since (monotonic), and where
        self.blocked: float | None = None
        self.frame: Any = None
        self.lasti = -1


_RAISED = object()  # the outcome of a run that raised
MAX_NEED = 1024
FOREVER = 1 << 62


class _History:
    """Short runs of one function in a row, and how many it needs to run inline: one
    at first, twice as many each time an inline run turned out long (a function whose
    runs are long now and then is rarely inline, one that waits never)."""

    __slots__ = ("need", "streak")

    def __init__(self) -> None:
        self.streak = 0
        self.need = 1


class Inline:
    """Per-function history of sync runs, and the runs on the loop's thread."""

    def __init__(self, limit_s: float | None = None) -> None:
        self.limit_s = settings.inline_s() if limit_s is None else limit_s
        self.abort_after = max(0.1, 2 * self.limit_s)
        self._history: dict[Any, _History] = {}  # per function
        self._lock = threading.Lock()
        self._run: _Run | None = None
        self.rerouted = 0  # runs aborted and re-run on a thread

    def ready(self, gf: GridFunction[..., Any]) -> bool:
        """Whether ``gf`` may run inline now: its last runs were short."""
        history = self._history.get(gf.name)
        return history is not None and history.streak >= history.need

    def timed(self, gf: GridFunction[..., Any], run: Callable[[], Any]) -> Callable[[], Any]:
        """``run`` for a thread, wrapped to record whether it was short."""

        def timed_run() -> Any:
            started = time.perf_counter()
            try:
                return guarded(run)
            finally:
                self._note(gf, time.perf_counter() - started)

        return timed_run

    def _note(self, gf: GridFunction[..., Any], seconds: float) -> None:
        history = self._history.get(gf.name)
        if history is None:
            history = self._history[gf.name] = _History()
            if _may_wait(gf.func):
                history.need = FOREVER
        if seconds < self.limit_s:
            history.streak += 1
        elif history.streak >= history.need:  # was inline: back to threads, for longer
            history.streak = 0
            history.need = min(history.need * 2, MAX_NEED)
        else:
            history.streak = 0

    def waited(self, name: str) -> None:
        """The function ``name`` waits on sub-calls: it never runs inline (a wait from
        the loop's thread must abort it, and its run so far is lost)."""
        history = self._history.setdefault(name, _History())
        history.streak, history.need = 0, FOREVER

    def check_waitable(self) -> None:
        """Called before a blocking wait: on the loop's thread it would deadlock."""
        run = self._run
        if run is not None and run.thread == threading.get_ident():
            run.needs_loop = True
            raise Reroute()

    def run(self, gf: GridFunction[..., Any], call: Callable[[], Any]) -> tuple[bool, Any]:
        """Run ``call`` here: ``(True, value)``, or ``(False, None)`` when it must run on
        a thread instead.  Raises what ``guarded`` would."""
        run = _Run(threading.get_ident())
        context = contextvars.copy_context()
        loop = asyncio.events._get_running_loop()
        # user code that starts a loop of its own (asyncio.run) may, as on a thread
        asyncio.events._set_running_loop(None)
        try:
            value, error = self._invoke(run, context, call)
        finally:
            asyncio.events._set_running_loop(loop)
        if run.blocked is not None:
            log.warning("%s blocked the worker's loop in C for %.1f s; it now runs on threads",
                        gf.name, time.monotonic() - run.since)  # fmt: skip
        if run.needs_loop:
            self.waited(gf.name)
        if run.aborted or run.needs_loop or isinstance(error, Reroute):
            self._note(gf, self.abort_after)
            self.rerouted += 1
            return False, None
        self._note(gf, time.monotonic() - run.since)
        if error is None:
            return True, value
        if isinstance(error, Exception):
            raise error
        raise UserExit(error) from None

    def _invoke(
        self, run: _Run, context: contextvars.Context, call: Callable[[], Any]
    ) -> tuple[Any, BaseException | None]:
        """Call user code so that a Reroute from the watchdog lands in it or is cleared:
        once ``_run`` is None under the lock none is raised any more, and one still
        pending is withdrawn before the loop runs on."""
        outcome: tuple[Any, BaseException | None] | None = None
        while True:
            try:
                if outcome is None:
                    if self._run is not run and not run.aborted:
                        with self._lock:
                            self._run = run
                    if run.aborted:  # delivered between the call and the assignment
                        outcome = (_RAISED, Reroute())
                    else:
                        outcome = _call(context, call)
                with self._lock:
                    self._run = None
                    if run.aborted:
                        _set_async_exc(run.thread, None)
                return outcome
            except Reroute:  # delivered in this frame, outside user code
                continue

    def abort_if_over(self) -> bool:
        """From the watchdog thread: abort the run inline if it went on too long.

        Returns True while the run is blocked in C: a Reroute raised a tick before has
        not landed and the run's frame has not moved since.  The caller then keeps the
        heartbeat alive.  The first such Reroute is withdrawn, so the run finishes
        inline and its result counts (rerun on a thread, it would block as long
        again); once its frame moves (it runs Python code again), it is aborted anew.
        """
        run = self._run
        if run is None or time.monotonic() - run.since < self.abort_after:
            return False
        with self._lock:
            if self._run is not run:
                return False
            frame = sys._current_frames().get(run.thread)
            lasti = -1 if frame is None else frame.f_lasti
            moved = frame is not run.frame or lasti != run.lasti
            run.frame, run.lasti = frame, lasti
            if not run.aborted and (run.blocked is None or moved):
                run.aborted = True
                _set_async_exc(run.thread, Reroute)
                return False
            if run.aborted and run.blocked is None and not moved:  # the Reroute is stuck
                run.aborted = False
                _set_async_exc(run.thread, None)
                run.blocked = time.monotonic()
            return run.blocked is not None and not moved


def _may_wait(func: Callable[..., Any]) -> bool:
    """Whether ``func``'s own code (nested functions included) names a wait.  A wait
    from a helper it calls is not seen here: that run is aborted and rerun instead."""
    code = getattr(func, "__code__", None)
    if code is None:
        return True
    glob = getattr(func, "__globals__", {})
    stack = [code]
    while stack:
        code = stack.pop()
        for name in code.co_names:
            if name in WAIT_NAMES or _is_wait(glob.get(name)):
                return True
        stack.extend(c for c in code.co_consts if hasattr(c, "co_names"))
    return False


def _is_wait(obj: Any) -> bool:
    """``pygirder.wait`` under another name."""
    return (
        getattr(obj, "__name__", None) == "wait" and getattr(obj, "__module__", None) == "pygirder"
    )


def _call(
    context: contextvars.Context, call: Callable[[], Any]
) -> tuple[Any, BaseException | None]:
    try:
        return context.run(call), None
    except BaseException as exc:
        return _RAISED, exc
