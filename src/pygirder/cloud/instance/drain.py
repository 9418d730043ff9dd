"""Draining an instance through the grid's Redis: ask it to stop, learn that it stopped.

Shrinking a fleet must not lose work, so an instance is not terminated outright: whoever
shrinks (``up`` on the operator's machine, or the fleet controller) writes a drain
request for it into the grid's Redis; the instance's agent, which polls for one, sends
SIGTERM to its service (a worker hands back its queued and parked calls and exits),
waits for it to exit and then records that it is drained.  Only then is the instance
terminated (or when the drain deadline passes: liveness requeues whatever a killed
worker held, so even then nothing is lost, it is only run again).

Redis is the channel because everything that drains already holds its password and
reaches it (the agent reads it from SSM for its service), while the operator cannot tag
instances after launch and SSH is not always there.  The keys live beside the grid's
own and are named per fleet::

    pygirder:fleet:{<fleet>}:drain     HASH instance id -> why it is drained (requests)
    pygirder:fleet:{<fleet>}:drained   HASH instance id -> unix time its service exited
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis

log = logging.getLogger("pygirder.agent")

# How often an agent asks whether it is to be drained.
DEFAULT_DRAIN_POLL_S = 2.0
# Drain records of instances that are gone do not outlive the fleet by long.
DRAIN_KEY_TTL_S = 7 * 24 * 3600


def drain_key(fleet: str) -> str:
    return f"pygirder:fleet:{{{fleet}}}:drain"


def drained_key(fleet: str) -> str:
    return f"pygirder:fleet:{{{fleet}}}:drained"


def request_drain(client: redis.Redis, fleet: str, ids: Iterable[str], reason: str) -> None:
    """Ask the agents of ``ids`` to stop their service."""
    mapping: dict[Any, Any] = {iid: reason for iid in ids}  # redis-py: keys invariant
    if not mapping:
        return
    pipe = client.pipeline(transaction=True)
    pipe.hset(drain_key(fleet), mapping=mapping)
    pipe.expire(drain_key(fleet), DRAIN_KEY_TTL_S)
    pipe.execute()


def drained(client: redis.Redis, fleet: str) -> dict[str, float]:
    """Instance id -> when its service exited after a drain request."""
    raw = client.hgetall(drained_key(fleet))
    out = {}
    for key, value in raw.items():
        iid = key.decode() if isinstance(key, bytes) else str(key)
        try:
            out[iid] = float(value)
        except ValueError:
            out[iid] = 0.0
    return out


def forget(client: redis.Redis, fleet: str, ids: Iterable[str]) -> None:
    """Drop the drain records of instances that are terminated."""
    ids = list(ids)
    if ids:
        pipe = client.pipeline(transaction=True)
        pipe.hdel(drain_key(fleet), *ids)
        pipe.hdel(drained_key(fleet), *ids)
        pipe.execute()


def mark_drained(client: redis.Redis, fleet: str, instance_id: str) -> None:
    pipe = client.pipeline(transaction=True)
    pipe.hset(drained_key(fleet), instance_id, f"{time.time():.3f}")
    pipe.expire(drained_key(fleet), DRAIN_KEY_TTL_S)
    pipe.execute()


class DrainWatcher(threading.Thread):
    """Polls the grid's Redis for a drain request of this instance; calls
    ``on_drain(reason)`` once.  Redis being unreachable is not a drain: it is retried."""

    def __init__(
        self,
        url: str,
        fleet: str,
        instance_id: str,
        on_drain: Callable[[str], None],
        interval_s: float = DEFAULT_DRAIN_POLL_S,
    ) -> None:
        super().__init__(name="drain-watcher", daemon=True)
        self.url = url
        self.fleet = fleet
        self.instance_id = instance_id
        self.on_drain = on_drain
        self.interval_s = interval_s
        self.done = threading.Event()
        self.requested = threading.Event()

    def _client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5)

    def run(self) -> None:
        client, url = self._client(), self.url
        try:
            while not self.done.wait(self.interval_s):
                if self.url != url:  # the grid moved to a replacement redis node
                    client.close()
                    client, url = self._client(), self.url
                try:
                    reason = client.hget(drain_key(self.fleet), self.instance_id)
                except redis.RedisError as exc:
                    log.debug("drain check failed: %s", exc)
                    continue
                if reason is not None:
                    text = reason.decode() if isinstance(reason, bytes) else str(reason)
                    log.warning("drain requested: %s", text)
                    self.requested.set()
                    self.on_drain(text)
                    return
        finally:
            client.close()

    def confirm(self) -> None:
        """Record that the service has exited after the drain (best effort, retried)."""
        client = self._client()
        try:
            for attempt in range(5):
                try:
                    mark_drained(client, self.fleet, self.instance_id)
                    return
                except redis.RedisError as exc:
                    log.warning("could not record the drain (attempt %d): %s", attempt + 1, exc)
                    time.sleep(1.0)
        finally:
            client.close()

    def cancel(self, timeout: float = 10.0) -> None:
        self.done.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join(timeout)
