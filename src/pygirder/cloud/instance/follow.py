"""Following the grid to a replacement redis node.

A fleet's redis node can be lost (an on-demand instance fails, a spot one is
reclaimed); ``pygirder cloud up`` then launches a replacement from the fleet's redis
launch template and writes its address, as ``DescribeInstances`` reports it, to the
SSM parameter ``/pygirder/<name>/<fleet>/redis-address``.  Only the operator writes
there: the instance role and the permissions boundary of every pygirder role allow
reading parameters, never writing them, so the address is as trusted as the fleet's
Redis password beside it.  Announcements, which any instance of the setup may
publish, never move a worker.

A worker's or distributor's agent reads the parameter when it starts (a worker
launched from the original template, whose user-data names the lost node, goes to
the replacement), and :class:`GridFollower` checks the grid while the service runs:
when the grid has not answered a PING for ``misses`` checks in a row, it reads the
parameter, and once a new address answers, the service is restarted against it.  The
supervisor holds a restart of a service that exited while the grid is unreachable
(:meth:`GridFollower.hold`), so a worker waits for its grid instead of giving up
after its quick failures.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import AgentError
from .announce import _client, _with_retries, fleet_parameter

if TYPE_CHECKING:
    from .supervisor import Supervisor

log = logging.getLogger("pygirder.agent")

# Seconds between checks that the grid answers; PYGIRDER_FOLLOW_INTERVAL_S overrides it.
DEFAULT_FOLLOW_INTERVAL_S = 10.0
# Unanswered checks in a row before the address is looked up again.
DEFAULT_MISSES = 3
# Longest wait between two lookups while the grid stays gone: a thousand workers then
# ask SSM about 17 times a second, under its default throughput of 40.
LOOKUP_CAP_S = 60.0


def follow_interval_s() -> float:
    return float(os.environ.get("PYGIRDER_FOLLOW_INTERVAL_S") or DEFAULT_FOLLOW_INTERVAL_S)


def redis_address_parameter(name: str, fleet: str) -> str:
    return fleet_parameter(name, fleet, "redis-address")


def check_grid_address(url: str) -> str:
    """``redis://<IPv4>:<port>/<db>`` and nothing else (no password, no host name)."""
    parts = urllib.parse.urlsplit(url)
    try:
        ipaddress.IPv4Address(parts.hostname or "")
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "redis" or parts.password or parts.username or not port:
        raise AgentError(f"{url!r} is not a redis://ADDRESS:PORT/DB address of a redis node")
    return url


def read_redis_address(name: str, fleet: str, *, region: str | None) -> str | None:
    """The fleet's current redis node address from SSM; None when it was never written
    (a fleet launched before replacements existed: its user-data's address holds)."""
    parameter = redis_address_parameter(name, fleet)
    ssm = _client("ssm", region)
    missing = ssm.exceptions.ParameterNotFound
    try:
        got = _with_retries(
            f"reading SSM parameter {parameter}", lambda: ssm.get_parameter(Name=parameter)
        )
    except AgentError as exc:
        if isinstance(exc.__cause__, missing):
            return None
        raise
    return check_grid_address(str(got["Parameter"]["Value"]))


def answers(url: str, password: str | None, timeout: float = 2.0) -> bool:
    """True when the server at ``url`` answers PING (after AUTH with the password)."""
    from ...server import _ping  # one raw RESP round trip, no client retries

    parts = urllib.parse.urlsplit(url)
    return _ping(parts.hostname or "", parts.port or 6379, password, timeout)


class GridFollower(threading.Thread):
    """Checks that the grid answers; after ``misses`` silent checks in a row, looks its
    address up (``resolve``) and calls ``on_move(new_url)`` once the new one answers."""

    def __init__(
        self,
        url: str,
        password: str | None,
        resolve: Callable[[], str | None],
        on_move: Callable[[str], None],
        *,
        interval_s: float | None = None,
        misses: int = DEFAULT_MISSES,
    ) -> None:
        super().__init__(name="grid-follower", daemon=True)
        self.url = url
        self.password = password
        self.resolve = resolve
        self.on_move = on_move
        self.interval_s = follow_interval_s() if interval_s is None else interval_s
        self.misses = max(1, misses)
        self.done = threading.Event()
        self.moves = 0
        self.lookups = 0
        self._lock = threading.Lock()
        self._next_lookup = 0.0
        self._lookup_wait = self.interval_s

    def reachable(self) -> bool:
        return answers(self.url, self.password)

    def check(self, missed: int) -> int:
        """One check; returns the count of unanswered checks in a row."""
        if self.reachable():
            self._next_lookup, self._lookup_wait = 0.0, self.interval_s
            return 0
        missed += 1
        if missed < self.misses or time.monotonic() < self._next_lookup:
            return missed
        # Looked up again after a growing, jittered wait while the grid stays gone.
        self.lookups += 1
        self._next_lookup = time.monotonic() + self._lookup_wait * random.uniform(0.5, 1.0)
        self._lookup_wait = min(LOOKUP_CAP_S, self._lookup_wait * 2)
        try:
            found = self.resolve()
        except AgentError as exc:
            log.warning("the grid at %s does not answer, and its address: %s", self.url, exc)
            return missed
        if not found or found == self.url:
            log.warning(
                "the grid at %s has not answered for %d checks; no other redis node is "
                "known yet (`pygirder cloud up` replaces a lost one)", self.url, missed,
            )  # fmt: skip
            return missed
        if not answers(found, self.password):
            log.warning("the redis node moved to %s, which does not answer yet", found)
            return missed
        with self._lock:
            old, self.url = self.url, found
            self.moves += 1
            self._next_lookup, self._lookup_wait = 0.0, self.interval_s
        log.warning("the grid moved from %s to %s: following it", old, found)
        self.on_move(found)
        return 0

    def run(self) -> None:
        missed = 0
        while not self.done.wait(self.interval_s):
            try:
                missed = self.check(missed)
            except Exception:  # the follower must outlive any one failed check
                log.exception("checking the grid failed")

    def hold(self, stopping: threading.Event) -> bool:
        """Before a restart: wait while the grid does not answer (this thread moves the
        address meanwhile); True when it waited.  A service that exited because its
        grid was gone has not failed, and is started again once there is a grid."""
        waited = False
        while not stopping.is_set() and not self.done.is_set() and not self.reachable():
            if not waited:
                log.warning("the grid at %s does not answer: holding the restart", self.url)
            waited = True
            stopping.wait(min(self.interval_s, 5.0))
        return waited

    def cancel(self, timeout: float = 10.0) -> None:
        self.done.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join(timeout)


def current_address(name: str, fleet: str, given: str | None, *, region: str | None) -> str | None:
    """The address a starting worker connects to: the parameter's when it was written
    (the redis node may have been replaced since the user-data was rendered), else
    ``given``.  An unreadable parameter is logged and ``given`` is used."""
    try:
        found = read_redis_address(name, fleet, region=region)
    except AgentError as exc:
        log.warning("could not read the grid's current address (%s); using %s", exc, given)
        return given
    if found and found != given:
        log.warning("the grid's redis node is now %s (the user-data names %s)", found, given)
    return found or given


def follower_for(
    *,
    name: str,
    fleet: str,
    region: str | None,
    url: str,
    password: str | None,
    supervisor: Supervisor,
    moved: Callable[[str], None],
) -> GridFollower:
    """A follower that restarts ``supervisor``'s service against the new address and
    holds its restarts while the grid is gone; ``moved(url_with_password)`` tells the
    other users of the address (the drain watcher, the dead-child recovery)."""
    from .supervisor import with_password

    def on_move(new: str) -> None:
        full = with_password(new, password)
        moved(full)
        supervisor.restart(f"the grid moved to {new}", {"PYGIRDER_REDIS": full})

    follower = GridFollower(
        url, password, lambda: read_redis_address(name, fleet, region=region), on_move
    )
    supervisor.hold = follower.hold
    return follower
