"""Server-side scripts: every state transition of a request is one atomic Lua script.

A request moves  new -> local (on a worker's stack) or queued (in a pool queue)
-> running (claimed by a worker) -> done (result stored, waiters notified).  Each
arrow is one script, so two processes can never both claim, both complete, or miss
each other's wake-ups: the server serialises scripts.

The scripts are the files ``lua/<name>.lua``; the header of each documents its KEYS
and ARGV.  Every key a script touches is passed in KEYS, except the keys it derives
from data it reads on the server (the inboxes in a waiter set, the state of an id
popped off a queue): those it builds from the key stems of :mod:`.keys` passed in ARGV
(``Keys.state("")`` and so on), which carry the namespace's hash tag.  So all the keys
of one script call hash to one cluster slot, as Redis Cluster, ElastiCache Serverless
and MemoryDB require.

Each file starts with ``#!lua``.  Without it a server runs a script in compatibility
mode, where a cluster node lets it touch keys of any slot the node owns: a key that
lost its hash tag would go unnoticed until the namespace spans nodes.  With it the
script fails at a key outside its slot (the cluster-mode tests rely on that), and a
server at its maxmemory refuses the script before it runs instead of failing it at its
first write, half done.

The functions at the end are the way in: one per script, taking named arguments and
building KEYS and ARGV from the key schema, so the layout of a script's arguments is
written once.  They run on anything with a ``run_script`` method (:class:`Runner`):
the grid's ``Runtime`` (which counts round trips and explains out-of-memory errors), or
a redis-py client wrapped in :class:`SyncRunner` or :class:`AsyncRunner`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

import msgpack
from redis.exceptions import NoScriptError

from .keys import INBOX_TTL_S, Keys

if TYPE_CHECKING:
    import redis
    import redis.asyncio as aioredis

# Result messages pushed to inboxes are "<flag><id><result?>": flag "1" means the
# encoded result follows inline (small results, saving the waiter a GET), "0" means
# the waiter fetches res:<id>.
INLINE_RESULT_LIMIT = 16 * 1024
# ... and a message of its own, pushed by a worker going idle (take.lua, complete.lua) to a worker
# that offered surplus work nobody took: "offer it now".
SHARE_NOW = b"s"

# Calls per submit: the client sends longer lists in chunks of this size, so one call
# stays a few milliseconds of server time.
SUBMIT_CHUNK = 512

# Ids per share call: a worker offers at most this many at a time, and one over its
# max_stack sends its surplus in chunks of this size.
SHARE_CHUNK = 512

# Ids per requeue call: explicit lists are sent in chunks of this size, and a call
# without ids hands back at most this many of the worker's entries (the caller repeats
# it until the script says nothing is left), so one call stays a few milliseconds.
REQUEUE_PAGE = 512

# Ids per cancel call: the client sends longer lists in chunks of this size.
CANCEL_CHUNK = 500

# Stale queue entries a take may drop beyond 4 * max, so a queue full of cancelled
# entries is drained a bounded step at a time.
TAKE_DROP_BUDGET = 256

# A new queued call whose payload is at most this size is handed straight to an idle
# worker of its pool (claimed for it and pushed to its inbox) instead of queued: the
# worker runs it without a take of its own.  Larger ones go through the queue.
HANDOFF_LIMIT = 16 * 1024

# An idle worker's mark in idle:<pool> counts for a hand-off this many seconds; an idle
# worker renews it every second (at each time-out of its blocking take), so the mark of
# a worker that died goes stale quickly.
HANDOFF_FRESH_S = 3

# Values the scripts read as Lua locals: declared in front of each script's code.
LUA_CONSTANTS = {
    "INBOX_TTL": INBOX_TTL_S,
    "DROP_BUDGET": TAKE_DROP_BUDGET,
    "REQUEUE_PAGE": REQUEUE_PAGE,
    "CANCEL_CHUNK": CANCEL_CHUNK,
    "HANDOFF_FRESH": HANDOFF_FRESH_S,
}

SHEBANG = "#!lua"

Arg = str | bytes | int | float


class AsyncClient(Protocol):
    """What running a script needs of an asyncio client: redis-py's, or the grid's lean
    connection (``grid.resp.LeanCommands``)."""

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any: ...

    def script_load(self, script: str) -> Any: ...


@dataclass(frozen=True)
class Script:
    """One server-side script, run by its SHA1 (EVALSHA) and loaded on a NOSCRIPT.

    A NOSCRIPT reply means the server did not run it (a restarted server forgot its
    script cache), so sending it again is safe; every other failure is the caller's to
    handle, and the client retries only lost connections (see ``connect_redis``).
    """

    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())

    async def run(self, client: AsyncClient, keys: Sequence[str | bytes],
                  args: Sequence[Arg]) -> Any:  # fmt: skip
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)

    def run_sync(self, client: redis.Redis, keys: Sequence[str | bytes],
                 args: Sequence[Arg]) -> Any:  # fmt: skip
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            client.script_load(self.source)
            return client.evalsha(self.sha, len(keys), *keys, *args)


def load(name: str) -> Script:
    """The script ``lua/<name>.lua``, with :data:`LUA_CONSTANTS` declared in front.

    The declaration goes at the start of the file's second line (a header comment),
    so the line numbers of a Lua error are those of the file.
    """
    path = resources.files(__package__).joinpath("lua", f"{name}.lua")
    text = path.read_text(encoding="utf-8")
    first, _, rest = text.partition("\n")
    if first != SHEBANG or not rest.startswith("--"):
        raise RuntimeError(
            f"{path}: a script starts with {SHEBANG!r} and a header comment on the next "
            "line documenting its KEYS and ARGV"
        )
    names = ", ".join(LUA_CONSTANTS)
    values = ", ".join(str(int(v)) for v in LUA_CONSTANTS.values())
    return Script(name, f"{first}\nlocal {names} = {values} {rest}")


SUBMIT = load("submit")
TAKE = load("take")
COMPLETE = load("complete")
SHARE = load("share")
REQUEUE = load("requeue")
CANCEL = load("cancel")
REACH = load("reach")
DISTRIBUTE = load("distribute")
WITHDRAW = load("withdraw")

ALL = (SUBMIT, TAKE, COMPLETE, SHARE, REQUEUE, CANCEL, REACH, DISTRIBUTE, WITHDRAW)


# -- running them --------------------------------------------------------------------
R = TypeVar("R", covariant=True)


class Runner(Protocol[R]):
    """Runs a script: ``run_script`` returns the reply, or an awaitable of it."""

    def run_script(self, script: Script, keys: list[str | bytes], args: list[Arg]) -> R: ...


class SyncRunner:
    """Runs scripts on a sync redis-py client (tools, tests, a worker's last words)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def run_script(self, script: Script, keys: list[str | bytes], args: list[Arg]) -> Any:
        return script.run_sync(self.client, keys, args)


class AsyncRunner:
    """Runs scripts on an asyncio redis-py client."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def run_script(self, script: Script, keys: list[str | bytes], args: list[Arg]) -> Any:
        return await script.run(self.client, keys, args)


def _key(stem: str, request_id: str | bytes) -> str | bytes:
    """The key of ``request_id`` under ``stem`` (Keys.state("") ...), also for an id that
    is not text (junk a worker took off a queue must still be named to be dropped)."""
    return stem + request_id if isinstance(request_id, str) else stem.encode() + request_id


# -- one function per script ---------------------------------------------------------
class Submission(NamedTuple):
    """One call to submit."""

    id: str
    payload: bytes
    pool: str
    local: bool  # on the owner's stack (True) or its pool's queue
    function: str
    summary: str  # of the arguments, for the call graph ('' without one)


def submit(
    conn: Runner[R],
    keys: Keys,
    calls: Sequence[Submission],
    *,
    process: str,
    owner: str = "",
    parent: str = "",
    graph_ttl: int = 0,
) -> R:
    """Submit-or-subscribe ``calls`` for ``process`` (its inbox is woken when each one
    finishes).  A client (no ``owner``) has what it waits for recorded, so the reaper
    can withdraw it if it dies.  A new queued call up to :data:`HANDOFF_LIMIT` bytes
    goes straight to an idle worker of its pool, if one waits.  Reply: per call its
    result, 0 (pending elsewhere) or 1 (new)."""
    items: list[Arg] = []
    call_keys: list[str | bytes] = [keys.stats, keys.children(parent), keys.owned(owner),
                                    keys.waits(process), keys.waiting_processes]  # fmt: skip
    for c in calls:
        items += [c.id, c.payload, c.pool, "l" if c.local else "q", c.function, c.summary]
        call_keys += [keys.result(c.id), keys.waiters(c.id), keys.state(c.id), keys.call(c.id),
                      keys.queue(c.pool)]  # fmt: skip
    # msgpack "raw" (no bin type): the server's Lua cmsgpack reads it as strings
    blob = msgpack.packb(items, use_bin_type=False)
    waiter = "" if owner else process
    args: list[Arg] = [keys.inbox(process), owner, parent, graph_ttl, waiter, blob,
                       keys.idle(""), keys.inflight(""), keys.inbox(""), keys.heartbeat(""),
                       HANDOFF_LIMIT]  # fmt: skip
    return conn.run_script(SUBMIT, call_keys, args)


def take(
    conn: Runner[R],
    keys: Keys,
    *,
    pool: str,
    worker: str,
    max: int,
    moved: bytes | None = None,
    waits: bool = False,
) -> R:
    """Claim up to ``max`` requests of ``pool`` for ``worker`` (and ``moved``, the id a
    blocking move already put in its in-flight list).  A worker that ``waits`` for work
    when this claims nothing is marked idle, taking hand-offs, and wakes the worker that
    last offered surplus nobody took (a :data:`SHARE_NOW` message in its inbox).
    Reply: id, payload, deaths, ..."""
    take_keys: list[str | bytes] = [keys.queue(pool), keys.inflight(worker), keys.idle(pool),
                                    keys.stats, keys.offers(pool)]  # fmt: skip
    args: list[Arg] = [worker, max, keys.state(""), keys.result(""), keys.call(""),
                       "1" if waits else "0", keys.inbox(""), SHARE_NOW]  # fmt: skip
    if moved is not None:
        take_keys += [_key(keys.state(""), moved), _key(keys.result(""), moved),
                      _key(keys.call(""), moved)]  # fmt: skip
        args.append(moved)
    return conn.run_script(TAKE, take_keys, args)


class Completion(NamedTuple):
    """One finished request."""

    id: str
    # the encoded result envelope; a worker's may also be a large bytes value held as
    # itself (grid.protocol.BytesEnvelope), which it writes with a SET of its own
    result: Any
    ttl: int  # seconds the result is kept (0: no expiry)
    started: float  # when its run started (epoch seconds)
    summary: str  # one line, of the result or error


def complete(
    conn: Runner[R],
    keys: Keys,
    results: Sequence[Completion],
    *,
    worker: str,
    inline_limit: int = INLINE_RESULT_LIMIT,
    idle_pool: str | None = None,
    resolved_here: bool = False,
) -> R:
    """Store ``results`` and wake every waiter of each; with ``idle_pool``, ``worker``
    has nothing else to run and is marked idle there, taking hand-offs and waking the
    latest offerer (as a take that claims nothing would).  ``resolved_here``: ``worker``
    already handed these results to its own waiters, so its inbox gets no message
    (a nested call's parent usually waits in the same process: the message would cost
    the server a push and the worker a read, for nothing).  Reply: how many were stored."""
    done_keys: list[str | bytes] = [keys.owned(worker), keys.inflight(worker), keys.stats,
                                    keys.failures, keys.idle(idle_pool or ""),
                                    keys.offers(idle_pool or "")]  # fmt: skip
    args: list[Arg] = [worker, inline_limit, keys.inbox(""),
                       "0" if idle_pool is None else "1", SHARE_NOW,
                       keys.inbox(worker) if resolved_here else ""]  # fmt: skip
    for r in results:
        done_keys += [keys.result(r.id), keys.waiters(r.id), keys.state(r.id), keys.call(r.id)]
        args += [r.id, r.result, r.ttl, r.started, r.summary]
    return conn.run_script(COMPLETE, done_keys, args)


def share(
    conn: Runner[R], keys: Keys, ids: Sequence[str], *, pool: str, worker: str, force: bool = False
) -> R:
    """Move ``ids`` (bottom of ``worker``'s stack first) to the pool queue while some
    worker of the pool is idle (all of them if ``force``); with none idle, record the
    offer, so the next worker to go idle wakes ``worker``.  Reply: the ids moved."""
    share_keys: list[str | bytes] = [keys.queue(pool), keys.idle(pool), keys.owned(worker),
                                     keys.stats, keys.offers(pool), keys.inflight(worker),
                                     *(keys.state(i) for i in ids)]  # fmt: skip
    return conn.run_script(SHARE, share_keys, [worker, "1" if force else "0", *ids])


def requeue(
    conn: Runner[R],
    keys: Keys,
    ids: Sequence[str | bytes] = (),
    *,
    worker: str,
    dead: bool = False,
    max_attempts: int = 0,
) -> R:
    """Hand ``ids`` of ``worker`` back to their pools (at most :data:`REQUEUE_PAGE`);
    without ids, the next page of everything it owns or has in flight.  A ``dead``
    worker's requests count a death, and one that reaches ``max_attempts`` is poison.
    Reply: [requeued, entries left, poisoned id, ...]."""
    back_keys: list[str | bytes] = [keys.owned(worker), keys.inflight(worker),
                                    keys.current(worker), keys.stats]  # fmt: skip
    st, res = keys.state(""), keys.result("")
    for i in ids:
        back_keys += [_key(st, i), _key(res, i)]
    args: list[Arg] = [worker, "1" if dead else "0", max_attempts, st, res, keys.queue(""), *ids]
    return conn.run_script(REQUEUE, back_keys, args)


def cancel(conn: Runner[R], keys: Keys, ids: Sequence[str], *, process: str) -> R:
    """``process`` no longer waits for ``ids`` (at most :data:`CANCEL_CHUNK`); those
    nobody waits for and that have not started are dropped.  Reply: the dropped ids."""
    cancel_keys: list[str | bytes] = [keys.stats]
    for i in ids:
        cancel_keys += [keys.waiters(i), keys.state(i), keys.call(i)]
    return conn.run_script(CANCEL, cancel_keys, [keys.inbox(process), *ids])


def reach(
    conn: Runner[R], keys: Keys, nodes: Sequence[str], *, target: str, budget: int, cursor: str
) -> R:
    """One bounded step of the search for ``target`` below ``nodes`` in the call graph
    (the first node's set from ``cursor``).  Reply: [found, expanded, cursor, pending]."""
    reach_keys: list[str | bytes] = [keys.children(n) for n in nodes]
    args: list[Arg] = [target, budget, cursor, keys.children(""), keys.result("")]
    return conn.run_script(REACH, reach_keys, args)


def distribute(
    conn: Runner[R], keys: Keys, *, child: str, parent: str, distributor: str, max_moves: int
) -> R:
    """One tick of ``distributor`` between pool ``child`` and pool ``parent``.
    Reply: [moved down, moved up]."""
    pool_keys: list[str | bytes] = [keys.queue(child), keys.queue(parent), keys.idle(child),
                                    keys.idle(parent), keys.stats]  # fmt: skip
    return conn.run_script(DISTRIBUTE, pool_keys, [distributor, max_moves])


def withdraw(conn: Runner[R], keys: Keys, *, process: str, max: int) -> R:
    """Take the dead client ``process`` out of up to ``max`` of the requests it waited
    for.  Reply: [ids withdrawn, abandoned, ids left]."""
    client_keys: list[str | bytes] = [keys.heartbeat(process), keys.waits(process),
                                      keys.inbox(process), keys.waiting_processes,
                                      keys.stats]  # fmt: skip
    args: list[Arg] = [process, max, keys.waiters(""), keys.state(""), keys.call("")]
    return conn.run_script(WITHDRAW, client_keys, args)
