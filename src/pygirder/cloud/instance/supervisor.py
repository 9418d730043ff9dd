"""The supervised grid service and the watchers beside it (spot notice, time-to-live).

The child is restarted with exponential backoff when it exits; SIGTERM/SIGINT to the
agent are forwarded to it.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

from ...errors import ConfigError
from ..errors import AgentError
from .common import (
    DEFAULT_REDIS_PORT,
    DEFAULT_SHUTDOWN_COMMAND,
    DEFAULT_SPOT_INTERVAL_S,
    Role,
    _backoff,
    _iso,
    _utcnow,
    is_simulated,
    mask_url,
)
from .metadata import ImdsClient

log = logging.getLogger("pygirder.agent")


# -- the supervised service ------------------------------------------------------------
def service_command(
    role: Role | str,
    *,
    bind: str = "127.0.0.1",
    port: int = DEFAULT_REDIS_PORT,
    password_file: str | os.PathLike[str] | None = None,
    pool: str = "default",
    parent: str | None = None,
    imports: Sequence[str] = (),
    processes: str = "auto",
    python: str | None = None,
) -> list[str]:
    """The command line of a role's service, run with this interpreter (``-m pygirder``).

    It never holds a password: the Redis URL of workers and distributors goes in their
    environment (:func:`service_environment`), the server reads a password file.
    """
    base = [python or sys.executable, "-m", "pygirder"]
    role = Role(role)
    if role is Role.REDIS:
        cmd = [*base, "server", "--bind", bind, "--port", str(port)]
        if password_file:
            cmd += ["--password-file", str(password_file)]
        return cmd
    if role is Role.DISTRIBUTOR:
        if not parent:
            raise ConfigError("role distributor needs --parent POOL (the pool it links up to)")
        return [*base, "distributor", "--pool", pool, "--parent", parent]
    cmd = [*base, "worker", "--pool", pool, "--processes", processes]
    for module in imports:
        cmd += ["--import", module]
    return cmd


def service_environment(
    role: Role | str, redis_url: str | None, password: str | None
) -> dict[str, str]:
    """Extra environment of a role's service: ``PYGIRDER_REDIS``, the URL with the password.

    ``pygirder worker`` and ``pygirder distributor`` read ``--redis`` from that variable,
    which keeps the password out of ``ps`` and of every command line we log.
    """
    if Role(role) is Role.REDIS:
        return {}
    if not redis_url:
        raise ConfigError(f"role {role} needs --redis URL (the address of the grid's Redis node)")
    return {"PYGIRDER_REDIS": with_password(redis_url, password)}


def with_password(url: str, password: str | None) -> str:
    """``redis://host:port/db`` with the password put in (percent-encoded)."""
    if not password:
        return url
    parts = urllib.parse.urlsplit(url if "://" in url else f"redis://{url}")
    host = parts.hostname or ""
    netloc = f":{urllib.parse.quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path or "/0", parts.query, ""))


ReadyProbe = Callable[[subprocess.Popen, float], bool]


def alive_for(grace_s: float) -> ReadyProbe:
    """Ready once the child has been running for ``grace_s`` seconds."""
    return lambda proc, elapsed: proc.poll() is None and elapsed >= grace_s


def redis_answers(host: str, port: int, password: str | None) -> ReadyProbe:
    """Ready once the server answers PING (after AUTH with the password)."""
    from ...server import _ping  # one raw RESP round trip, no client retries

    return lambda proc, elapsed: _ping(host, port, password, 1.0)


class Supervisor:
    """Run one child process, restart it when it exits, stop it on request.

    ``run()`` blocks until ``stop()`` is called (returns normally once the child has
    exited) or until the child failed ``max_restarts`` times in a row without staying
    up for ``stable_after_s`` (raises :class:`AgentError`).  ``stop()`` is thread-safe:
    it sends SIGTERM to the child at once, then ``run()`` waits up to
    ``stop_timeout_s`` before SIGKILLing the child's process group.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        ready_probe: ReadyProbe | None = None,
        on_ready: Callable[[], object] | None = None,
        ready_timeout_s: float = 120.0,
        max_restarts: int = 5,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 60.0,
        stable_after_s: float = 60.0,
        stop_timeout_s: float = 30.0,
        poll_s: float = 0.1,
        on_exit: Callable[[int], object] | None = None,
        hold: Callable[[threading.Event], bool] | None = None,
    ) -> None:
        self.command = list(command)
        # called before every restart: may wait (for the grid, say) and returns whether
        # it did; then the exit is not the service's failure and is not counted
        self.hold = hold
        # called with the pid of every child that exited, before any restart: a grid
        # worker's requests are requeued then, not when its heartbeat expires
        self.on_exit = on_exit
        self.env = dict(env) if env is not None else None
        self.ready_probe = ready_probe or alive_for(2.0)
        self.on_ready = on_ready
        self.ready_timeout_s = ready_timeout_s
        self.max_restarts = max_restarts
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.stable_after_s = stable_after_s
        self.stop_timeout_s = stop_timeout_s
        self.poll_s = poll_s
        self.starts = 0
        self.stop_reason: str | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._signalled: subprocess.Popen | None = None
        self._restart = threading.Event()

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self, reason: str) -> None:
        with self._lock:
            if self.stop_reason is None:
                self.stop_reason = reason
                log.info("stopping the service: %s", reason)
            self._stopping.set()
        self._signal_child()

    def restart(self, reason: str, env: Mapping[str, str] | None = None) -> None:
        """Stop the running child and start it again at once (with ``env`` merged into
        its environment); not counted as a failure.  Thread-safe."""
        with self._lock:
            if env:
                self.env = {**(self.env if self.env is not None else os.environ), **env}
            self._restart.set()
        log.info("restarting the service: %s", reason)
        self._signal_child()

    def _signal_child(self) -> None:
        with self._lock:
            proc = self._proc
            if proc is None or proc is self._signalled or proc.poll() is not None:
                return
            self._signalled = proc
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass

    def _start(self) -> subprocess.Popen:
        log.info("starting %s", mask_url(shlex.join(self.command)))
        with self._lock:
            self._restart.clear()  # a restart asked for while no child ran is done now
            env = self.env
        proc = subprocess.Popen(
            self.command, env=env, stdin=subprocess.DEVNULL, start_new_session=True
        )
        with self._lock:
            self._proc = proc
        self.starts += 1
        if self._stopping.is_set():  # stop() raced with the start
            self._signal_child()
        return proc

    def _finish(self, proc: subprocess.Popen) -> int:
        try:
            return proc.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("service did not exit %ss after SIGTERM; killing it", self.stop_timeout_s)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return proc.wait()

    def _exited(self, proc: subprocess.Popen) -> None:
        if self.on_exit is not None:
            self.on_exit(proc.pid)

    def run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            if self.starts and self.hold is not None and self.hold(self._stopping):
                failures = 0
                if self._stopping.is_set():
                    return
            started = time.monotonic()
            proc = self._start()
            ready = False
            while proc.poll() is None and not self._stopping.is_set():
                elapsed = time.monotonic() - started
                if not ready and self.ready_probe(proc, elapsed):
                    ready = True
                    log.info("service is ready (pid %d)", proc.pid)
                    if self.on_ready is not None:
                        self.on_ready()
                elif not ready and elapsed > self.ready_timeout_s:
                    log.error("service not ready after %.0fs; restarting it", elapsed)
                    proc.send_signal(signal.SIGTERM)
                    self._finish(proc)
                    break
                if self._restart.is_set():
                    break
                self._stopping.wait(self.poll_s)
            if self._restart.is_set() and not self._stopping.is_set():
                status = self._finish(proc)
                self._exited(proc)
                log.info("service exited with status %s for a restart", status)
                failures = 0
                continue
            if self._stopping.is_set():
                self._signal_child()
                status = self._finish(proc)
                log.info("service exited with status %s", status)
                self._exited(proc)
                return
            status = proc.wait()
            self._exited(proc)
            ran = time.monotonic() - started
            failures = 1 if ran >= self.stable_after_s else failures + 1
            if failures > self.max_restarts:
                raise AgentError(
                    f"the service failed {failures} times in a row (last exit status {status}, "
                    f"after {ran:.1f}s); giving up. Command: {mask_url(shlex.join(self.command))}"
                )
            delay = _backoff(failures, base=self.backoff_base_s, cap=self.backoff_cap_s)
            log.warning(
                "service exited with status %s after %.1fs; restart %d/%d in %.1fs",
                status, ran, failures, self.max_restarts, delay,
            )  # fmt: skip
            self._stopping.wait(delay)


# -- watchers ----------------------------------------------------------------------------
class _Watcher(threading.Thread):
    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.done = threading.Event()

    def cancel(self, timeout: float = 60.0) -> None:
        """Stop watching; wait for a callback in progress (an announcement) to finish."""
        self.done.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join(timeout)


class SpotWatcher(_Watcher):
    """Polls IMDS for a spot interruption notice; calls ``on_notice(notice)`` once.

    With ``on_rebalance`` it also asks for a rebalance recommendation (the earlier
    warning that the instance is at elevated risk) and calls ``on_rebalance(time)``
    once, then keeps watching for the notice: the instance still serves until then.
    """

    def __init__(
        self,
        imds: ImdsClient,
        on_notice: Callable[[dict[str, str]], None],
        interval_s: float = DEFAULT_SPOT_INTERVAL_S,
        on_rebalance: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__("spot-watcher")
        self.imds = imds
        self.on_notice = on_notice
        self.interval_s = interval_s
        self.on_rebalance = on_rebalance

    def run(self) -> None:
        on_rebalance = self.on_rebalance
        while not self.done.wait(self.interval_s):
            try:
                notice = self.imds.spot_action()
                if notice is None and on_rebalance is not None:
                    recommended = self.imds.rebalance_recommendation()
                    if recommended is not None:
                        log.warning("rebalance recommendation at %s", recommended)
                        on_rebalance(recommended)
                        on_rebalance = None
            except AgentError as exc:
                log.debug("spot check failed: %s", exc)
                continue
            if notice is not None:
                log.warning("spot interruption notice: %s at %s", notice["action"], notice["time"])
                self.on_notice(notice)
                return


class DeadlineWatcher(_Watcher):
    """Calls ``on_expiry()`` once at ``expires`` (immediately if it is already past)."""

    def __init__(self, expires: datetime, on_expiry: Callable[[], None]) -> None:
        super().__init__("ttl-watcher")
        self.expires = expires
        self.on_expiry = on_expiry

    def run(self) -> None:
        while True:
            remaining = (self.expires - _utcnow()).total_seconds()
            if remaining <= 0:
                break
            if self.done.wait(min(remaining, 60.0)):
                return
        log.warning("time-to-live ran out at %s", _iso(self.expires))
        self.on_expiry()


def resolve_expiry(ttl: float | None, expires: str | None) -> datetime | None:
    if ttl is not None and expires is not None:
        raise ConfigError("give --ttl or --expires, not both")
    if ttl is not None:
        if ttl <= 0:
            raise ConfigError(f"--ttl must be positive seconds, not {ttl}")
        return _utcnow() + timedelta(seconds=ttl)
    if expires is not None:
        try:
            when = datetime.fromisoformat(expires.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ConfigError(
                f"--expires {expires!r} is not an ISO time (e.g. 2026-01-01T12:00:00Z)"
            ) from exc
        return when if when.tzinfo else when.replace(tzinfo=UTC)
    return None


def shut_down(command: str | None) -> int:
    """Run the shutdown command; the default one is never run on a simulated instance."""
    if command is None:
        if is_simulated():
            log.warning(
                "simulated instance: not running %r on this host (pass --shutdown-command)",
                DEFAULT_SHUTDOWN_COMMAND,
            )
            return 0
        command = DEFAULT_SHUTDOWN_COMMAND
    log.warning("shutting the instance down: %s", command)
    try:
        proc = subprocess.run(shlex.split(command), check=False, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("shutdown command %r failed: %s", command, exc)
        return 1
    if proc.returncode != 0:
        log.error("shutdown command %r exited with status %d", command, proc.returncode)
    return proc.returncode
