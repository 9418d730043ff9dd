"""Every key pygirder writes, in one place: the grid's only key schema.

All keys of a grid share the prefix ``pg:{<namespace>}:`` so several grids can share
one server and ``SCAN pg:{ns}:*`` finds everything of one grid.  The braces are a
Redis Cluster hash tag: all keys of a namespace hash to one slot, so every server-side
script (``store/lua/*.lua``) touches keys of one slot only, as a cluster requires.
Scripts name no key themselves: they get the keys in KEYS, and build the keys they
derive from data they read (an id popped off a queue) from the stems below passed in
ARGV (``Keys.state("")`` is the stem of every ``st:<id>``), so a key always carries
the tag.  ``tests/store`` checks both on a cluster-mode server.

Per namespace (``<id>``: a request id, ``<proc>``: a process id, a worker's too)::

    key              type     written by                                  expires
    ---------------  -------  ------------------------------------------  ------------------
    res:<id>         STRING   complete (a worker)                         result_ttl (0: no),
                                                                          error_ttl for errors
    st:<id>          HASH     submit; take, share, requeue update it;     no (gone once the
                              complete, cancel, withdraw delete it        request is done)
    arg:<id>         STRING   the submitter, before submit, for a         ARGUMENT_TTL_S; the
                              payload too large for the script            worker deletes it
                                                                          once the result is
                                                                          stored
    wt:<id>          SET      submit adds inboxes; cancel, withdraw       deleted by complete
                              remove them
    q:<pool>         LIST     submit, share, requeue push; take pops;     no
                              distribute moves between pools
    idle:<pool>      HASH     take or complete of a worker waiting for    no
                              work ('h' + time: it takes hand-offs);
                              take and submit (a hand-off) clear it;
                              distribute (a distributor standing in)
    inbox:<proc>     LIST     complete pushes results, submit hand-offs   INBOX_TTL_S, renewed
                              to an idle worker; the process reads it     by every push
    inflight:<proc>  LIST     take, submit (a hand-off); complete and     no
                              requeue remove
    owned:<proc>     SET      submit (local calls); share, complete,      no
                              requeue remove
    cur:<proc>       STRING   a worker, for the request holding its       requeue of the dead
                              baton when a death must be blamed           worker deletes it
    waits:<proc>     SET      submit (clients); the client trims it;      INBOX_TTL_S
                              withdraw pops it
    wprocs           SET      submit adds clients; withdraw removes them  no
    hb:<proc>        STRING   every process, each heartbeat               HEARTBEAT_TTL_S
                                                                          (PYGIRDER_HEARTBEAT_TTL)
    workers          HASH     workers and distributors register;          no
                              the reaper removes dead ones
    stats            HASH     the scripts (HINCRBY); the reaper           no
    logs             STREAM   every process's log handler                 capped at about
                                                                          LOG_STREAM_MAXLEN
    failures         LIST     complete (failed requests)                  capped at 200
    dead             LIST     a worker (undecodable payloads)             capped at 1,000
    reaper           STRING   the one worker reaping dead processes       3 reaping periods
    call:<id>        HASH     submit; take, complete, cancel, withdraw    CALL_GRAPH_TTL_S
    kids:<id>        SET      submit (the calls a request made)           CALL_GRAPH_TTL_S

``pygirder gc`` drops idle results, call records, children and inboxes, and pending
requests nobody waits for.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

# How long a pushed inbox survives without its reader (a process that died without
# cleaning up leaves at most this much garbage behind).
INBOX_TTL_S = 24 * 3600
# A worker that has not refreshed its heartbeat for this long is considered dead.
HEARTBEAT_TTL_S = 10
# How long the call graph (call:<id>, kids:<id>) of a request is kept.
CALL_GRAPH_TTL_S = 3600
# A large payload stored beside its request is kept this long: longer than any request
# should wait in a queue.
ARGUMENT_TTL_S = 7 * 24 * 3600
# Approximate cap of the grid-wide log stream (XADD MAXLEN ~).
LOG_STREAM_MAXLEN = 100_000


def glob_escape(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH pattern (namespaces may hold * ? [ ]): the
    keys of namespace ``p*`` must not match those of ``prod``."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


@dataclass(frozen=True)
class Keys:
    """Key names for one namespace.  Methods, not constants, so typos fail loudly."""

    namespace: str = "default"

    @functools.cached_property
    def prefix(self) -> str:
        # cached: every key of every call is built on it, several per call
        return f"pg:{{{self.namespace}}}:"

    # -- requests -------------------------------------------------------------
    def result(self, request_id: str) -> str:
        """STRING: the encoded result envelope of a finished request."""
        return f"{self.prefix}res:{request_id}"

    def argument(self, request_id: str) -> str:
        """STRING: a large payload of a pending request, stored beside it (its ``st``
        hash then holds ``protocol.PAYLOAD_OUTSIDE``)."""
        return f"{self.prefix}arg:{request_id}"

    def state(self, request_id: str) -> str:
        """HASH: payload and state of a pending request (gone once finished)."""
        return f"{self.prefix}st:{request_id}"

    def waiters(self, request_id: str) -> str:
        """SET: inbox names to notify when the request finishes."""
        return f"{self.prefix}wt:{request_id}"

    # -- pools and processes ----------------------------------------------------
    def queue(self, pool: str) -> str:
        """LIST: request ids waiting for any worker of the pool (LPUSH in, RPOP out)."""
        return f"{self.prefix}q:{pool}"

    def idle(self, pool: str) -> str:
        """HASH: worker id -> time it became idle, for workers blocked on the pool queue
        (``h`` in front: a worker that takes hand-offs from submit)."""
        return f"{self.prefix}idle:{pool}"

    def offers(self, pool: str) -> str:
        """ZSET: worker id -> time it last offered surplus work that no idle worker of the
        pool was there to take; a worker going idle wakes the latest of them."""
        return f"{self.prefix}offers:{pool}"

    def inbox(self, process_id: str) -> str:
        """LIST: completion messages for the waiters of one process, and for a worker
        the requests a submit handed to it."""
        return f"{self.prefix}inbox:{process_id}"

    def inflight(self, worker_id: str) -> str:
        """LIST: request ids a worker took from a pool queue and has not finished."""
        return f"{self.prefix}inflight:{worker_id}"

    def owned(self, worker_id: str) -> str:
        """SET: request ids on a worker's local stack or running there."""
        return f"{self.prefix}owned:{worker_id}"

    def current(self, worker_id: str) -> str:
        """STRING: the request holding the worker's baton, written only for requests that
        were already on a worker that died, and by a worker whose event loop is torn down
        (so a death can be blamed precisely)."""
        return f"{self.prefix}cur:{worker_id}"

    def waits(self, process_id: str) -> str:
        """SET: ids of requests a client waits for (added by submit, trimmed by the
        client as results arrive), so the reaper can withdraw a client that died."""
        return f"{self.prefix}waits:{process_id}"

    @property
    def waiting_processes(self) -> str:
        """SET: ids of the clients that have a ``waits`` set."""
        return f"{self.prefix}wprocs"

    def heartbeat(self, process_id: str) -> str:
        """STRING with TTL: present while the process is alive."""
        return f"{self.prefix}hb:{process_id}"

    @property
    def workers(self) -> str:
        """HASH: worker id -> JSON description (host, pid, pool, started)."""
        return f"{self.prefix}workers"

    @property
    def stats(self) -> str:
        """HASH: grid-wide counters (submitted, executed, cached, shared, failed...)."""
        return f"{self.prefix}stats"

    @property
    def logs(self) -> str:
        """STREAM: structured log records of every grid process (capped)."""
        return f"{self.prefix}logs"

    @property
    def failures(self) -> str:
        """LIST: ids of the most recent failed requests, newest first (capped at 200)."""
        return f"{self.prefix}failures"

    @property
    def dead_letters(self) -> str:
        """LIST: undecodable payloads taken off a queue, kept for inspection."""
        return f"{self.prefix}dead"

    @property
    def reaper_lock(self) -> str:
        """STRING with TTL: held by the one process currently reaping dead workers."""
        return f"{self.prefix}reaper"

    def call(self, request_id: str) -> str:
        """HASH: call-graph record of a request: fn, args (summary), parent, pool, state
        (queued, taken, done, failed), worker, submitted/started/finished (epoch seconds),
        summary (of the result or error).  Expires after CALL_GRAPH_TTL_S."""
        return f"{self.prefix}call:{request_id}"

    def children(self, request_id: str) -> str:
        """SET: ids of the calls a request made (its children in the call graph)."""
        return f"{self.prefix}kids:{request_id}"
