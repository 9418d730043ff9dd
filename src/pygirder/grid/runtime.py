"""The async core every grid process shares: scripts, inbox, futures, cache.

Clients and workers both submit calls and wait for results the same way; only what
happens to a new request differs (a client queues it on a pool, a worker keeps it on
its own stack).  One inbox per process receives completion messages, and one future
per request id per process is shared by every local waiter.  The result wire format
is in ``protocol``, opening clients in ``connection``, error translation in
``translate``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from .. import settings
from ..codec import DEFAULT_LIMITS
from ..errors import CodecError, GridTimeout
from ..store import scripts
from ..store.keys import ARGUMENT_TTL_S, CALL_GRAPH_TTL_S, Keys
from . import bulk
from .connection import connect_redis
from .protocol import (
    COMPRESS_BYTES,
    ID_LEN,
    PAYLOAD_OUTSIDE,
    Envelope,
    call_summary,
    compress,
    compressing,
    decode_envelope,
    expand,
    settle,
)
from .resp import LeanCommands, Reader, connect_reader, is_lean
from .translate import out_of_memory

if TYPE_CHECKING:
    from ..calls import Call

log = logging.getLogger("pygirder.grid")

# Inbox reads in flight at once (see Runtime._listen), and the loop turns the inbox
# loop lets pass before it arms the next read while one is still armed: a result's
# waiter is woken through a chain of futures (the result's, the wait's, the caller's
# task, and a sync caller's thread), which should not queue behind that write.
READS_AHEAD = 2
SETTLE_TURNS = 3


def new_process_id(kind: str) -> str:
    return f"{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _refused_for_memory(exc: redis_errors.ResponseError) -> bool:
    return isinstance(exc, redis_errors.OutOfMemoryError) or str(exc).startswith("OOM")


class Runtime:
    """Submission, waiting and the local result cache of one process, on one event loop."""

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "default",
        process_id: str | None = None,
        cache_size: int = 4096,
        call_graph: bool = True,
        max_connections: int | None = None,
        lean_scripts: bool = False,
    ) -> None:
        self.url = url
        self.max_connections = max_connections  # of the command client (None: as needed)
        # Scripts on a lean connection of their own (resp.LeanCommands): a client's
        # submit is on the path of every call it makes, and redis-py costs about four
        # times the lean connection's CPU per command.  One connection more: a worker,
        # whose connections are counted, keeps its scripts on the command client.
        self.lean_scripts = lean_scripts and is_lean(url)
        self._scripts: LeanCommands | None = None
        self.keys = Keys(namespace)
        self.process_id = process_id or new_process_id("proc")
        self.inbox = self.keys.inbox(self.process_id)
        self.cache_size = cache_size
        # results are bounded by bytes too: 4,096 results of 10 MB would be 40 GB
        self.cache_bytes = settings.cache_bytes()
        self._cached_bytes = 0
        self.graph_ttl = CALL_GRAPH_TTL_S if call_graph else 0
        self.redis: aioredis.Redis | None = None
        self._listener_client: Reader | None = None
        self._listener: asyncio.Task[None] | None = None
        self._waiting: dict[str, asyncio.Future[Envelope]] = {}
        # what is needed to submit a waited-for request again after a server restart
        self._resubmit: dict[str, tuple[bytes, str, str]] = {}
        self._lost: dict[str, int] = {}  # waited-for results that expired before a fetch
        self._cache: OrderedDict[str, Envelope] = OrderedDict()
        self._beat: asyncio.Task[None] | None = None
        self._server_run_id: str | None = None
        self.liveness = settings.liveness()
        self.on_server_restart: list[Any] = []  # async callbacks run after resubmission
        self.beat_hooks: list[Any] = []  # async callbacks run at every heartbeat
        self.on_share_now: list[Callable[[], None]] = []  # a peer went idle (take, complete)
        self._interest: dict[str, int] = {}  # local waiters per pending request
        self.round_trips = 0  # submit/fetch commands issued by this process (for reports)
        self._inbox_block = settings.inbox_block()
        self._closing = False
        self._beaten = False
        self._finished: list[str] = []  # waited-for ids to trim from the server's record
        self._records_waits = False  # set by the first submission without an owner
        self.listener_restarts = 0
        self.outside_payloads: set[str] = set()  # read with read_payload, result not stored
        # called with the calls a submission queued as new, before it returns, where no
        # worker would ever take them (a private grid without workers: its store answers
        # them, or they fail); None where workers take them
        self.answer_queued: Callable[[list[Call[Any]]], Awaitable[None]] | None = None
        # a worker's: called with (id, payload) of each request a submit handed to it
        # through its inbox (claimed for it already: see store/lua/submit.lua)
        self.on_handoff: Callable[[str, bytes], None] | None = None

    async def start(self) -> None:
        settings.pickle_codec()  # a bad PYGIRDER_SECRET fails here, not at the first result
        settings.compression()  # and a bad PYGIRDER_COMPRESS
        await self.connect()
        self._listener_client = await connect_reader(self.url, block=self._inbox_block)
        self._server_run_id = await self._run_id()
        await self.beat()
        self._start_listener()
        self._beat = asyncio.create_task(self._heartbeat(), name="pygirder-heartbeat")

    async def connect(self, reconnect_timeout: float | None = None) -> None:
        """Open the command client: enough to run scripts, with no heartbeat, inbox
        or listener (``start`` adds those)."""
        self.redis = await connect_redis(
            self.url, max_connections=self.max_connections, reconnect_timeout=reconnect_timeout
        )
        if self.lean_scripts:  # reached already: this one connects at its first script
            self._scripts = LeanCommands(self.url, reconnect_timeout=reconnect_timeout)

    async def _run_id(self) -> str | None:
        """The server's run id: it changes when the server restarts."""
        assert self.redis is not None
        info = await self.redis.info("server")
        run_id = info.get("run_id")
        return str(run_id) if run_id is not None else None

    async def beat(self) -> bool:
        """Refresh this process's heartbeat, run the beat hooks (a worker's registration)
        and trim the server's record of what this process waits for.

        Returns True when the heartbeat had lapsed since the last beat: the reaper may
        then have withdrawn this process from what it waits for.
        """
        assert self.redis is not None
        previous = await self.redis.set(
            self.keys.heartbeat(self.process_id), b"1",
            px=int(self.liveness.heartbeat_ttl * 1000), get=True,
        )  # fmt: skip
        lapsed, self._beaten = previous is None and self._beaten, True
        for hook in self.beat_hooks:
            await hook()
        await self._trim_waits()
        return lapsed

    async def _trim_waits(self) -> None:
        """Drop what no longer needs waiting for from this process's ``waits`` set."""
        assert self.redis is not None
        done, self._finished = self._finished, []
        key = self.keys.waits(self.process_id)
        try:
            for start in range(0, len(done), 1024):
                await self.redis.srem(key, *done[start : start + 1024])
        except BaseException:
            self._finished[:0] = done  # try again at the next beat
            raise

    async def reap_waiters(self, budget: int = 4096) -> int:
        """Withdraw dead clients from what they waited for (up to ``budget`` requests
        per call; the rest at the next one).  Returns how many requests nobody waited for
        any more and were dropped before they started."""
        assert self.redis is not None
        procs = [p.decode() for p in await self.redis.smembers(self.keys.waiting_processes)]
        if not procs:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for pid in procs:
                pipe.exists(self.keys.heartbeat(pid))
            alive = await pipe.execute()
        abandoned = 0
        for pid in (p for p, a in zip(procs, alive, strict=True) if not a):
            withdrawn = dropped = 0
            while budget > 0:
                handled, gone, left = await scripts.withdraw(
                    self, self.keys, process=pid, max=min(budget, 256)
                )
                budget -= max(1, handled)
                withdrawn, dropped = withdrawn + handled, dropped + gone
                if not left or not handled:
                    break
            if withdrawn:
                log.warning("process %s died waiting: withdrew it from %d requests, %d of "
                            "them abandoned", pid, withdrawn, dropped)  # fmt: skip
            abandoned += dropped
        return abandoned

    async def _heartbeat(self) -> None:
        """Beat, and notice a server restart: then submit again what we wait for."""
        while not self._closing:  # a cancel that a client command swallowed ends it too
            await asyncio.sleep(self.liveness.heartbeat_every)
            try:
                lapsed = await self.beat()
                run_id = await self._run_id()
                if run_id != self._server_run_id:
                    log.warning("the server restarted; submitting %d waited-for calls again",
                                len(self._waiting))  # fmt: skip
                    self._server_run_id = run_id
                    await self.resubmit_waiting()
                    for callback in self.on_server_restart:
                        await callback()
                elif lapsed and self._waiting:
                    log.warning("this process's heartbeat lapsed; registering again as the "
                                "waiter of %d calls", len(self._waiting))  # fmt: skip
                    await self.resubmit_waiting()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep beating; the reaper decides what a gap means
                log.warning("heartbeat failed: %s", exc)

    async def resubmit_waiting(self) -> None:
        """Register again as a waiter of everything this process waits for.

        After a restart without persistence the server has forgotten the requests, their
        queues and their waiters; this puts back what is still needed.
        """
        await self._submit_again([i for i in self._waiting if i in self._resubmit])

    async def _submit_again(self, ids: list[str]) -> None:
        """Submit these waited-for requests again (as a client would, to the pool queue)."""
        for start in range(0, len(ids), 256):
            batch = ids[start : start + 256]
            self._records_waits = True  # submitted without an owner: recorded
            items = []
            for request_id in batch:
                payload, pool, name = self._resubmit[request_id]
                items.append(scripts.Submission(request_id, payload, pool, False, name, ""))
            replies = await self._submit(items, owner="", parent="")
            for request_id, reply in zip(batch, replies, strict=True):
                if isinstance(reply, bytes):
                    self.resolve(request_id, reply)

    async def _submit(
        self, items: Sequence[scripts.Submission], *, owner: str, parent: str
    ) -> list[Any]:
        if any(len(item.payload) > COMPRESS_BYTES for item in items):
            items = await self._store_payloads(items)
        reply: list[Any] = await scripts.submit(
            self, self.keys, items, process=self.process_id, owner=owner, parent=parent,
            graph_ttl=self.graph_ttl,
        )  # fmt: skip
        return reply

    async def _store_payloads(
        self, items: Sequence[scripts.Submission]
    ) -> list[scripts.Submission]:
        """Store the large payloads of ``items`` with plain SETs (compressed on a
        network), before the script makes their requests visible; the items for the
        script, those payloads replaced by PAYLOAD_OUTSIDE.  Copied through a script's
        arguments a payload is copied several times more inside the server, and the
        reply to a worker's take would carry it through redis-py's slow reader."""
        assert self.redis is not None
        packed = compressing(self.url)
        out = []
        for item in items:
            if len(item.payload) > COMPRESS_BYTES:
                value = compress(item.payload) if packed else item.payload
                key = self.keys.argument(item.id)
                try:
                    await bulk.set_value(self.redis, key, value, ex=ARGUMENT_TTL_S)
                except redis_errors.ResponseError as exc:
                    if _refused_for_memory(exc):
                        raise out_of_memory(self.url, "store arguments") from None
                    raise
                item = item._replace(payload=PAYLOAD_OUTSIDE)
            out.append(item)
        return out

    async def read_payload(self, request_id: str) -> bytes:
        """The payload stored beside a request (its script payload was PAYLOAD_OUTSIDE);
        a CodecError when it is gone.  Remembered in ``outside_payloads`` until the
        result is stored (``drop_payloads``)."""
        assert self.redis is not None
        [data] = await bulk.get_values(self.redis, [self.keys.argument(request_id)], convert=bytes)
        if data is None:
            raise CodecError(
                f"the arguments of request {request_id} are no longer on the server (a large "
                f"payload is kept {ARGUMENT_TTL_S // 86400} days); submit the call again"
            )
        self.outside_payloads.add(request_id)
        return expand(data, limit=DEFAULT_LIMITS["max_arg_bytes"], what="request payload")

    async def drop_payloads(self, request_ids: Sequence[str]) -> None:
        """Delete the stored payloads of these requests, whose results are stored."""
        done = [i for i in request_ids if i in self.outside_payloads]
        if not done:
            return
        assert self.redis is not None
        self.outside_payloads.difference_update(done)
        try:
            await self.redis.unlink(*(self.keys.argument(i) for i in done))
        except Exception as exc:  # they expire by themselves
            log.debug("could not delete %d stored payloads: %s", len(done), exc)

    async def cancel(self, request_ids: Sequence[str]) -> list[str]:
        """Stop waiting for these requests; those nobody else waits for and that have not
        started are dropped from their queues.  Returns the dropped ids."""
        for request_id in request_ids:
            fut = self._waiting.pop(request_id, None)
            self._resubmit.pop(request_id, None)
            if fut is not None:
                self._stop_waiting(request_id)
                if not fut.done():
                    fut.cancel()
        dropped: list[str] = []
        # in chunks: one script call per chunk keeps the server free for everyone else
        for start in range(0, len(request_ids), scripts.CANCEL_CHUNK):
            chunk = request_ids[start : start + scripts.CANCEL_CHUNK]
            reply = await scripts.cancel(self, self.keys, chunk, process=self.process_id)
            dropped += [d.decode() for d in reply]
        return dropped

    async def close(self) -> None:
        """Stop the background tasks and close the connections, each step bounded.

        A task caught inside a client command can take long to unwind after it is
        cancelled (the connection closes under its own time-out); closing must still end
        promptly, and what is still running is cancelled with the event loop.
        """
        self._closing = True
        tasks = [t for t in (self._beat, self._listener) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        for fut in self._waiting.values():
            if not fut.done():
                fut.cancel()
        self._waiting.clear()
        try:
            if self.redis is not None:
                # bounded: with the server gone, the client would retry for the whole
                # reconnect window; the inbox and heartbeat expire by themselves anyway
                await asyncio.wait_for(
                    self.redis.delete(self.inbox, self.keys.heartbeat(self.process_id)), 2.0
                )
        except Exception:
            pass
        finally:
            for client in (self._listener_client, self._scripts, self.redis):
                if client is not None:
                    try:
                        await asyncio.wait_for(client.aclose(), 2.0)
                    except Exception as exc:  # closing what is left is the loop's job
                        log.debug("closing a server connection failed: %s", exc)

    async def run_script(
        self, script: scripts.Script, keys: list[str | bytes], args: list[scripts.Arg]
    ) -> Any:
        """Run one server-side script (the functions of ``store.scripts`` call this):
        counted in ``round_trips``, and an out-of-memory refusal explained."""
        client = self._scripts or self.redis
        assert client is not None
        self.round_trips += 1
        try:
            return await script.run(client, keys, args)
        except redis_errors.ResponseError as exc:
            if _refused_for_memory(exc):
                raise out_of_memory(self.url, script.name) from None
            raise

    # -- results -------------------------------------------------------------
    def _remember(self, request_id: str, data: Envelope) -> None:
        """Keep a result for later calls of this process, the oldest going first once
        the cache holds ``cache_size`` results or ``cache_bytes`` bytes."""
        cache = self._cache
        old = cache.pop(request_id, None)
        if old is not None:
            self._cached_bytes -= len(old)
        if len(data) * 4 > self.cache_bytes:
            return  # too big to keep: it would push out everything else
        cache[request_id] = data
        self._cached_bytes += len(data)
        while len(cache) > self.cache_size or self._cached_bytes > self.cache_bytes:
            _, dropped = cache.popitem(last=False)
            self._cached_bytes -= len(dropped)

    def forget_cached(self) -> None:
        """Empty this process's cache of recent results."""
        self._cache.clear()
        self._cached_bytes = 0

    def resolve(self, request_id: str, data: Envelope) -> None:
        """A result arrived (from the inbox, a submit reply, or this process's own worker)."""
        self._remember(request_id, data)
        self._resubmit.pop(request_id, None)
        self._lost.pop(request_id, None)
        fut = self._waiting.pop(request_id, None)
        if fut is not None:
            self._stop_waiting(request_id)
            if not fut.done():
                fut.set_result(data)

    def _stop_waiting(self, request_id: str) -> None:
        """Remember to trim the id from the server's record of what this client waits
        for (only submissions without an owner, a client's, are recorded)."""
        if self._records_waits:
            self._finished.append(request_id)

    def _start_listener(self) -> None:
        self._listener = asyncio.create_task(self._listen(), name="pygirder-inbox")
        self._listener.add_done_callback(self._listener_stopped)

    def _listener_stopped(self, task: asyncio.Task[None]) -> None:
        """Supervision: the inbox is the only way results arrive, so its reader must
        never stay dead.  Whatever stopped it (short of closing), start it again."""
        if self._closing or task.cancelled():
            return
        exc = task.exception()
        self.listener_restarts += 1
        log.error("the inbox listener stopped (%s: %s); restarting it",
                  type(exc).__name__, exc)  # fmt: skip
        asyncio.get_running_loop().call_later(0.2, self._restart_listener)

    def _restart_listener(self) -> None:
        if not self._closing:
            self._start_listener()

    async def _listen(self) -> None:
        """Read completion messages from the inbox, for as long as the process lives.

        Each read blocks on the server for at most ``PYGIRDER_INBOX_BLOCK`` seconds,
        well inside the socket time-out, so a quiet wait is a loop of empty replies, not
        of errors.  Two reads are in flight (:data:`READS_AHEAD`): while this loop hands
        out one batch of messages, the next read already waits on the server, so the
        next message is not held up by the write that arms a read, and that write waits
        (:data:`SETTLE_TURNS`) until what the messages woke has run.  Any error (a lost
        connection, a time-out, a server error) is logged and the read is repeated with
        backoff; messages a failed read or fetch may have lost are recovered by looking
        up the results of everything still waited for.
        """
        assert self._listener_client is not None and self.redis is not None
        client = self._listener_client
        backoff = 0.05
        recheck = False
        # the second read waits on the server behind the first one's whole block
        timeout = settings.socket_timeout() + READS_AHEAD * self._inbox_block
        armed: deque[asyncio.Future[Any]] = deque()
        try:
            # Closing also ends the loop: redis-py can swallow the cancel of a blocking
            # read, and the read then returns as if nothing happened.
            while not self._closing:
                try:
                    if recheck:
                        await self._recheck_waiting()
                        recheck = False
                    if armed:  # a read still waits on the server: arming the next can wait
                        for _ in range(SETTLE_TURNS):
                            await asyncio.sleep(0)
                    while len(armed) < READS_AHEAD:
                        armed.append(await client.send(
                            "BLMPOP", self._inbox_block, 1, self.inbox, "RIGHT", "COUNT", 1024,
                            timeout=timeout,
                        ))  # fmt: skip
                    reply = await armed.popleft()
                    fetch = self._deliver(reply[1]) if reply else []
                    if fetch:
                        await self._fetch_results(fetch)
                    backoff = 0.05
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # a read that failed with it is dropped; one still waiting on a sound
                    # connection delivers its messages as usual
                    while armed and armed[0].done() and armed[0].exception() is not None:
                        armed.popleft()
                    log.warning("reading the inbox failed (%s: %s); retrying in %.2fs",
                                type(exc).__name__, exc, backoff)  # fmt: skip
                    recheck = True
                    await asyncio.sleep(backoff)
                    backoff = min(2 * backoff, 1.0)
        finally:
            for read in armed:  # the process stops listening: nobody takes these
                read.cancel()

    def _deliver(self, messages: list[bytes]) -> list[str]:
        """Resolve inline results and pass on hand-offs; return the ids whose result
        must be fetched."""
        fetch: list[str] = []
        for msg in messages:
            if msg == scripts.SHARE_NOW:
                for hook in self.on_share_now:
                    hook()
                continue
            request_id = msg[1 : 1 + ID_LEN].decode()
            flag = msg[:1]
            if flag == b"1":
                self.resolve(request_id, msg[1 + ID_LEN :])
            elif flag == b"2":
                if self.on_handoff is not None:
                    self.on_handoff(request_id, msg[1 + ID_LEN :])
                else:  # only a worker marks itself idle; its in-flight list keeps it
                    log.warning("request %s was handed to %s, which runs nothing",
                                request_id, self.process_id)  # fmt: skip
            elif request_id in self._waiting:
                fetch.append(request_id)
        return fetch

    async def _recheck_waiting(self) -> None:
        """Resolve every waited-for request whose result is already stored."""
        assert self.redis is not None
        ids = list(self._waiting)
        for start in range(0, len(ids), 1024):
            batch = ids[start : start + 1024]
            values = await self.redis.mget([self.keys.result(i) for i in batch])
            for request_id, data in zip(batch, values, strict=True):
                if data is not None:
                    self.resolve(request_id, data)

    async def _fetch_results(self, ids: list[str]) -> None:
        assert self.redis is not None
        self.round_trips += 1
        # each value made into the envelope this process keeps as soon as it is read:
        # a batch of large results never sits in memory twice (read, then decoded)
        values = await bulk.get_values(
            self.redis, [self.keys.result(i) for i in ids], convert=settle
        )
        again: list[str] = []
        for request_id, data in zip(ids, values, strict=True):
            if data is not None:
                self.resolve(request_id, data)
            elif request_id in self._resubmit and self._lost.get(request_id, 0) < 3:
                # expired between completion and fetch (the hot tier lets results go once
                # the durable store has them): ask again; a worker restores or re-runs it
                self._lost[request_id] = self._lost.get(request_id, 0) + 1
                again.append(request_id)
            else:  # expired again and again: ask for a longer TTL
                self._resubmit.pop(request_id, None)
                fut = self._waiting.pop(request_id, None)
                self._stop_waiting(request_id)
                if fut is not None and not fut.done():
                    fut.set_exception(
                        GridTimeout(
                            f"the result of request {request_id} expired before it was read; "
                            "raise the result TTL (--result-ttl, PYGIRDER_HOT_TTL)",
                            call_ids=(request_id,),
                        )
                    )
        if again:
            await self._submit_again(again)

    # -- submission ----------------------------------------------------------
    async def submit(
        self,
        calls: Iterable[Call[Any]],
        *,
        owner: str = "",
        local_pool: str = "default",
        parent: str = "",
    ) -> tuple[list[asyncio.Future[Envelope]], list[tuple[str, bytes]], list[str]]:
        """Submit-or-subscribe every call.

        Returns one future per call, the new requests this process must run itself
        (worker-local ones, as (id, payload)), and the ids that were already pending
        elsewhere: only waiting on those can close a cycle.
        """
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Envelope]] = []
        sent: list[tuple[str, bytes, str]] = []
        sent_calls: list[Call[Any]] = []
        items: list[scripts.Submission] = []
        for call in calls:
            request_id = call.id
            fut = self._waiting.get(request_id)
            if fut is None:
                fut = loop.create_future()
                cached = self._cache.get(request_id)
                if cached is not None:
                    fut.set_result(cached)
                else:
                    self._waiting[request_id] = fut
                    pool = call.pool or local_pool
                    local = bool(owner) and pool == local_pool
                    payload = call.payload()
                    self._resubmit[request_id] = (payload, pool, call.function.name)
                    summary = call_summary(call) if self.graph_ttl else ""
                    items.append(scripts.Submission(request_id, payload, pool, local,
                                                    call.function.name, summary))  # fmt: skip
                    sent.append((request_id, payload, "l" if local else "q"))
                    sent_calls.append(call)
            futures.append(fut)
        new_local: list[tuple[str, bytes]] = []
        shared: list[str] = []
        queued: list[Call[Any]] = []
        if not sent:
            return futures, new_local, shared
        self._records_waits = self._records_waits or not owner
        # in chunks: one script call per chunk keeps the server free for everyone else
        step = scripts.SUBMIT_CHUNK
        for start in range(0, len(sent), step):
            chunk = sent[start : start + step]
            try:
                replies = await self._submit(items[start : start + step], owner=owner,
                                             parent=parent)  # fmt: skip
            except BaseException as exc:
                # the caller gets the error and waits for none of these: fail every
                # future of this submission, and take back what earlier chunks put on
                # the grid (new local ones go to the pool queue, and whatever nobody
                # else waits for is cancelled), so nothing is left dangling
                self._fail_submitted(sent, exc)
                if start:
                    await asyncio.shield(self._take_back(owner, sent[:start]))
                raise
            for (request_id, payload, mode), call, reply in zip(
                chunk, sent_calls[start : start + step], replies, strict=True
            ):
                if isinstance(reply, bytes):
                    self.resolve(request_id, reply)
                elif reply == 1 and mode == "l":
                    new_local.append((request_id, payload))
                elif reply == 1:
                    queued.append(call)
                elif reply == 0:
                    shared.append(request_id)
        if queued and self.answer_queued is not None:
            try:
                await self.answer_queued(queued)
            except Exception as exc:  # nothing may be left waiting for what nobody runs
                for call in queued:
                    self.fail(call.id, exc)
        return futures, new_local, shared

    def _fail_submitted(self, sent: Sequence[tuple[str, bytes, str]], exc: BaseException) -> None:
        """Fail the futures a failed submission created: its caller gets ``exc`` and
        waits for none of them."""
        for request_id, _, _ in sent:
            self.fail(request_id, exc if isinstance(exc, Exception) else GridTimeout("cancelled"))

    def fail(self, request_id: str, exc: Exception) -> None:
        """Fail every local waiter of a request that will get no result."""
        self._resubmit.pop(request_id, None)
        fut = self._waiting.pop(request_id, None)
        self._stop_waiting(request_id)
        if fut is not None and not fut.done():
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: a waiter that gave up is not an error

    async def _take_back(self, owner: str, sent: Sequence[tuple[str, bytes, str]]) -> None:
        """Undo submissions whose caller failed before it could wait for them."""
        local = [request_id for request_id, _, mode in sent if mode == "l"]
        try:
            for start in range(0, len(local), scripts.REQUEUE_PAGE):
                chunk = local[start : start + scripts.REQUEUE_PAGE]
                await scripts.requeue(self, self.keys, chunk, worker=owner)
            await self.cancel([request_id for request_id, _, _ in sent])
        except Exception as exc:  # the grid keeps them; they just run
            log.warning("could not take back %d submitted calls: %s", len(sent), exc)

    async def wait(
        self,
        futures: Sequence[asyncio.Future[Envelope]],
        calls: Sequence[Call[Any]],
        timeout: float | None,
    ) -> list[Any]:
        """Results in call order; the first failure (in call order) is raised.

        A waiter that gives up (time-out or cancellation) withdraws its interest; a
        request nobody in this process waits for any more is cancelled on the grid,
        which drops it if it has not started.
        """
        ids = [c.id for c in calls]
        self.hold(ids, futures)
        try:
            pending = {f for f in futures if not f.done()}
            if pending and not await all_done(pending, timeout):
                missing = tuple(i for i, f in zip(ids, futures, strict=True) if not f.done())
                names = sorted(
                    {c.function.name for c, f in zip(calls, futures, strict=True)
                     if not f.done()}
                )  # fmt: skip
                raise GridTimeout(
                    f"{len(missing)} of {len(calls)} calls ({', '.join(names)}) did not "
                    f"finish within {timeout}s; those not yet started were cancelled, "
                    "started ones run to the end and their results are memoized",
                    call_ids=missing,
                )
            return [decode_envelope(f.result(), i) for f, i in zip(futures, ids, strict=True)]
        except (GridTimeout, asyncio.CancelledError):
            await asyncio.shield(self._withdraw(ids, futures, give_up=True))
            raise
        finally:
            self._withdraw_local(ids)

    def hold(self, ids: Sequence[str], futures: Sequence[asyncio.Future[Envelope]]) -> None:
        """Count a local waiter for each pending request (``let_go`` ends it)."""
        for request_id, fut in zip(ids, futures, strict=True):
            if not fut.done():
                self._interest[request_id] = self._interest.get(request_id, 0) + 1

    async def let_go(self, ids: Sequence[str], futures: Sequence[asyncio.Future[Envelope]]) -> None:
        """Give up waiting: cancel on the grid what nobody else here waits for, and
        forget its payload."""
        try:
            await self._withdraw(ids, futures, give_up=True)
        finally:
            self._withdraw_local(ids)

    def let_go_local(self, ids: Sequence[str]) -> None:
        """Stop counting a local waiter (the results arrived)."""
        self._withdraw_local(ids)

    def _withdraw_local(self, ids: Sequence[str]) -> None:
        for request_id in ids:
            left = self._interest.get(request_id, 0) - 1
            if left > 0:
                self._interest[request_id] = left
            else:
                self._interest.pop(request_id, None)

    async def _withdraw(
        self, ids: Sequence[str], futures: Sequence[asyncio.Future[Envelope]], *, give_up: bool
    ) -> None:
        """Cancel on the grid what this process waited for and nobody else here does."""
        abandoned = [
            i for i, f in zip(ids, futures, strict=True)
            if not f.done() and self._interest.get(i, 0) <= 1
        ]  # fmt: skip
        if abandoned and give_up:
            try:
                await self.cancel(list(dict.fromkeys(abandoned)))
            except Exception as exc:  # the grid keeps the requests; they just run
                log.warning("could not cancel %d abandoned calls: %s", len(abandoned), exc)


async def all_done(
    pending: Iterable[asyncio.Future[bytes]],
    timeout: float | None,
    *,
    also: asyncio.Future[Any] | None = None,
) -> bool:
    """Wait until every future in ``pending`` is done, or ``timeout`` seconds, or
    ``also`` is done; True if they all finished.  Giving up cancels none of them
    (other waiters share them).

    One private future, set by a callback on each: a waiter is woken one loop turn
    after its last result, and a map of many calls pays no shield per call."""
    pending = list(pending)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    left = len(pending)

    def one(_: asyncio.Future[bytes]) -> None:
        nonlocal left
        left -= 1
        if not left and not done.done():
            done.set_result(None)

    def stop(_: object = None) -> None:
        if not done.done():
            done.set_result(None)

    for fut in pending:
        fut.add_done_callback(one)
    if also is not None:
        also.add_done_callback(stop)
    timer = loop.call_later(timeout, stop) if timeout is not None else None
    try:
        await done
    finally:
        if timer is not None:
            timer.cancel()
        for fut in pending:
            fut.remove_done_callback(one)
        if also is not None:
            also.remove_done_callback(stop)
    return left == 0
