"""How long the grid's server scripts hold the server, under bulk work.

The server runs one script at a time: while one runs, every other client waits
(heartbeats included, so a long script can get live workers reaped).  This bench
fills a private Valkey with raw pipelined commands, then measures three phases:

1. cancel ``--cancel`` calls of ``--queued`` queued ones (``Runtime.cancel``);
2. take the queue empty, as a worker does (the TAKE script, 16 per call), which
   also drops the entries the cancel left behind;
3. a cycle check (``CycleChecks.check``, round after round, as the worker's cycle
   loop runs it) of a request waiting on a call with ``--children`` unfinished
   children, one of which waits on the request;
4. a client submitting ``--submit`` calls in one wait (``Runtime.submit``);
5. the reaper requeueing a dead worker that owned ``--stack`` stack entries (and a
   few in flight): ``Recovery.reap_workers``;
6. a worker over its ``max_stack`` forcing ``--share`` stack entries onto the pool
   queue (``Sharing.share(..., force=True)``).

For each phase it prints the longest script as Valkey's SLOWLOG timed it (the
server is started with ``slowlog-log-slower-than 0``, so every command is logged),
the worst event of Valkey's LATENCY monitor, and the longest PING round trip seen by
another client during the phase.  Target: every script under 50 ms.

    python bench/scripts_latency.py [--queued 100000] [--cancel 10000]
                                    [--children 500000] [--submit 50000]
                                    [--stack 100000] [--share 100000] [--json FILE]

Run it with another checkout's code first on ``PYTHONPATH`` to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import sys
import threading
import time
import uuid
from typing import Any

import redis

import pygirder
from pygirder.grid.runtime import Runtime
from pygirder.grid.worker import Parked, Worker, WorkerOptions
from pygirder.server import EmbeddedServer
from pygirder.store import scripts
from pygirder.store.keys import Keys

TARGET_MS = 50.0
NAMESPACE = "bench"
PAYLOAD = b"\x93\xb0tasks:work\xa8f00dfeed\xc4\x40" + bytes(64)  # a request's size


def ping_loop(url: str, ready: Any, stop: Any, longest: Any) -> None:
    """Another client, in its own process: PINGs every few milliseconds and keeps the
    longest round trip (in ms) in ``longest``."""
    client = redis.Redis.from_url(url, socket_timeout=600)
    client.ping()
    ready.set()
    while not stop.is_set():
        t0 = time.perf_counter()
        while True:  # a BUSY reply (a script over busy-reply-threshold) is waiting too
            try:
                client.ping()
                break
            except redis.ResponseError:
                time.sleep(0.01)
        longest.value = max(longest.value, (time.perf_counter() - t0) * 1000)
        time.sleep(0.005)
    client.close()


class SlowlogReader(threading.Thread):
    """Empties the SLOWLOG every ``period`` seconds (GET and RESET in one MULTI) and
    keeps the longest duration and the count per command; scripts are named by their
    SHA.  With ``slowlog-log-slower-than 0`` the server logs every command, those run
    inside scripts too, so the log is read often to keep it short."""

    def __init__(self, url: str, period: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url, socket_timeout=600)
        self.period = period
        self.stop = threading.Event()
        self.names = {s.sha: s.name for s in scripts.ALL}
        self.durations: dict[str, list[int]] = {}  # microseconds, per command or script

    def drain(self) -> None:
        while True:
            try:
                pipe = self.client.pipeline(transaction=True)
                pipe.slowlog_get(-1)
                pipe.slowlog_reset()
                entries, _ = pipe.execute()
                break
            except redis.ResponseError:  # BUSY: a long script is running
                time.sleep(0.05)
        for entry in entries:
            words = entry["command"].split()
            cmd = words[0].decode().upper() if words else "?"
            if cmd in ("PING", "SLOWLOG", "MULTI", "EXEC", "LATENCY"):
                continue
            if cmd in ("EVALSHA", "EVAL") and len(words) > 1:
                cmd = "script " + self.names.get(words[1].decode(), "empty")
            self.durations.setdefault(cmd, []).append(int(entry["duration"]))

    def run(self) -> None:
        while not self.stop.wait(self.period):
            self.drain()
        self.drain()
        self.client.close()


class Phase:
    """SLOWLOG, LATENCY and another client's PING figures for what runs inside it."""

    def __init__(self, client: redis.Redis, url: str, name: str) -> None:
        self.client, self.url, self.name = client, url, name
        self.row: dict[str, Any] = {"phase": name}

    def __enter__(self) -> Phase:
        self.client.slowlog_reset()
        self.client.execute_command("LATENCY", "RESET")
        ctx = multiprocessing.get_context("spawn")
        ready, self.stop, self.ping_ms = ctx.Event(), ctx.Event(), ctx.Value("d", 0.0)
        self.pinger = ctx.Process(target=ping_loop, args=(self.url, ready, self.stop, self.ping_ms))
        self.pinger.start()
        if not ready.wait(60):
            raise RuntimeError("the PING process did not start")
        self.reader = SlowlogReader(self.url)
        self.reader.start()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.started
        self.stop.set()
        self.pinger.join(10)
        self.reader.stop.set()
        self.reader.join()
        events = self.client.execute_command("LATENCY", "LATEST") or []
        runs = {
            k.removeprefix("script "): sorted(v)
            for k, v in sorted(self.reader.durations.items()) if k.startswith("script ")
        }  # fmt: skip
        longest = {k: v[-1] / 1000 for k, v in runs.items()}
        worst = max(longest, key=longest.__getitem__) if longest else "-"
        figures = {
            k: {"calls": len(v), "median_ms": round(v[len(v) // 2] / 1000, 2),
                "p99_ms": round(v[(99 * len(v)) // 100] / 1000, 2),
                "max_ms": round(v[-1] / 1000, 2)}
            for k, v in runs.items()
        }  # fmt: skip
        self.row.update(
            wall_s=round(wall, 2),
            scripts=figures,
            worst=worst,
            worst_ms=round(longest.get(worst, 0.0), 2),
            latency_max_ms=max((int(e[3]) for e in events), default=0),
            ping_max_ms=round(self.ping_ms.value, 2),
        )


@pygirder.fn
def bench_work(i: int) -> int:
    """A call to submit (no worker runs it in this bench)."""
    return i


def new_ids(n: int) -> list[str]:
    return [uuid.uuid4().hex for _ in range(n)]


def fill_queue(client: redis.Redis, keys: Keys, ids: list[str], inbox: str) -> None:
    for start in range(0, len(ids), 5000):
        pipe = client.pipeline(transaction=False)
        chunk = ids[start : start + 5000]
        for request_id in chunk:
            state = {"p": PAYLOAD, "s": "queued", "pool": "default"}
            pipe.hset(keys.state(request_id), mapping=state)
            pipe.sadd(keys.waiters(request_id), inbox)
        pipe.lpush(keys.queue("default"), *chunk)
        pipe.execute()


def fill_owned(client: redis.Redis, keys: Keys, worker: str, ids: list[str]) -> None:
    """Requests on ``worker``'s stack, as a grid function's sub-calls leave them."""
    for start in range(0, len(ids), 5000):
        pipe = client.pipeline(transaction=False)
        chunk = ids[start : start + 5000]
        for request_id in chunk:
            state = {"p": PAYLOAD, "s": "local", "o": worker, "pool": "default"}
            pipe.hset(keys.state(request_id), mapping=state)
        pipe.sadd(keys.owned(worker), *chunk)
        pipe.execute()


def fill_children(client: redis.Redis, keys: Keys, parent: str, kids: list[str]) -> None:
    for start in range(0, len(kids), 10_000):
        client.sadd(keys.children(parent), *kids[start : start + 10_000])


async def run(args: argparse.Namespace, url: str, client: redis.Redis) -> list[dict[str, Any]]:
    keys = Keys(NAMESPACE)
    rows = []
    # the floor: how long a script that does nothing can take on this machine now (a
    # busy machine deschedules the server in the middle of a script now and then)
    noop = client.register_script("return 1")
    with Phase(client, url, "control: an empty script, 5,000 calls") as ph:
        for _ in range(5000):
            noop(keys=[], args=[])
    ph.row["note"] = "the machine's floor"
    rows.append(ph.row)
    runtime = Runtime(url, namespace=NAMESPACE, process_id="bench-client")
    await runtime.start()
    try:
        ids = new_ids(args.queued)
        fill_queue(client, keys, ids, runtime.inbox)
        cancel = random.Random(1).sample(ids, args.cancel)
        with Phase(client, url, f"cancel {args.cancel:,} of {args.queued:,} queued") as ph:
            cancelled = await runtime.cancel(cancel)
        ph.row["note"] = f"{len(cancelled):,} cancelled"
        rows.append(ph.row)

        with Phase(client, url, "take the queue empty, 16 per call") as ph:
            taken = 0
            deadline = time.monotonic() + args.time_limit
            while client.llen(keys.queue("default")) and time.monotonic() < deadline:
                reply = await scripts.take(runtime, keys, pool="default", worker="bench-worker",
                                           max=16)  # fmt: skip
                taken += len(reply) // 3
        left = client.llen(keys.queue("default"))
        ph.row["note"] = f"{taken:,} taken" + (f", {left:,} left (time limit)" if left else "")
        rows.append(ph.row)
    finally:
        await runtime.close()

    request, child = new_ids(2)
    kids = new_ids(args.children)
    fill_children(client, keys, child, kids)
    client.sadd(keys.children(kids[len(kids) // 2]), request)  # the way back: a cycle
    worker = Worker(url, WorkerOptions(namespace=NAMESPACE))
    await worker.runtime.start()
    try:
        loop = asyncio.get_running_loop()
        parked = Parked(children=[child], since=time.monotonic(),
                         cycle=loop.create_future(), next_check=0.0)  # fmt: skip
        name = f"cycle check through a call with {args.children:,} children"
        with Phase(client, url, name) as ph:
            rounds, errors = 0, 0
            deadline = time.monotonic() + args.time_limit
            while not parked.cycle.done() and time.monotonic() < deadline:
                try:
                    await worker.cycles.check(request, parked)
                except Exception:  # the worker's cycle loop logs it and carries on
                    errors += 1
                rounds += 1
        found = parked.cycle.done()
        ph.row["note"] = f"{'found' if found else 'NOT found'} in {rounds} round(s)"
        if errors:
            ph.row["note"] += f", {errors} failed (BUSY, time-out)"
        rows.append(ph.row)
    finally:
        await worker.runtime.close()
        worker.threads.shutdown(wait=False)
    rows += await run_bulk(args, url, client)
    return rows


async def run_bulk(args: argparse.Namespace, url: str, client: redis.Redis) -> list[dict[str, Any]]:
    """The phases where one call of the grid's code hands the server a long list."""
    keys = Keys(NAMESPACE)
    rows = []
    client.delete(keys.queue("default"))
    runtime = Runtime(url, namespace=NAMESPACE, process_id="bench-submitter", call_graph=False)
    await runtime.start()
    try:
        calls = [bench_work(i) for i in range(args.submit)]
        with Phase(client, url, f"submit {args.submit:,} calls in one wait") as ph:
            futures, _, _ = await runtime.submit(calls)
        queued = client.llen(keys.queue("default"))
        ph.row["note"] = f"{queued:,} queued, {len(futures):,} futures"
        rows.append(ph.row)
    finally:
        await runtime.close()
    client.delete(keys.queue("default"))

    dead = "bench-dead-worker"
    stack, inflight = new_ids(args.stack), new_ids(16)
    fill_owned(client, keys, dead, stack)
    for request_id in inflight:
        state = {"p": PAYLOAD, "s": "running", "o": dead, "pool": "default"}
        client.hset(keys.state(request_id), mapping=state)
    client.lpush(keys.inflight(dead), *inflight)
    client.hset(keys.workers, dead, json.dumps({"pool": "default"}))  # no heartbeat: dead
    worker = Worker(url, WorkerOptions(namespace=NAMESPACE))
    await worker.runtime.start()
    try:
        with Phase(client, url, f"reap a dead worker owning {args.stack:,}") as ph:
            reaped = await worker.recovery.reap_workers()
        queued = client.llen(keys.queue("default"))
        ph.row["note"] = f"{len(reaped)} reaped, {queued:,} requeued"
        rows.append(ph.row)
        client.delete(keys.queue("default"))

        shared = new_ids(args.share)
        fill_owned(client, keys, worker.id, shared)
        worker.stack[:] = [(request_id, PAYLOAD, False) for request_id in shared]
        with Phase(client, url, f"forced share of {args.share:,} stack entries") as ph:
            moved = await worker.sharing.share(len(worker.stack), force=True)
        ph.row["note"] = f"{moved:,} moved, {len(worker.stack):,} kept"
        rows.append(ph.row)
    finally:
        await worker.runtime.close()
        worker.threads.shutdown(wait=False)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--cancel", type=int, default=10_000)
    parser.add_argument("--children", type=int, default=500_000)
    parser.add_argument("--submit", type=int, default=50_000)
    parser.add_argument("--stack", type=int, default=100_000)
    parser.add_argument("--share", type=int, default=100_000)
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per phase")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument(
        "--slowlog-threshold", type=int, default=0,
        help="slowlog-log-slower-than in microseconds (0: log every command; reading that "
        "many entries adds to LATENCY and PING)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    extra = ["--slowlog-log-slower-than", str(args.slowlog_threshold),
             "--slowlog-max-len", "1000000", "--latency-monitor-threshold", "1"]  # fmt: skip
    with EmbeddedServer(extra_args=extra) as server:
        client = redis.Redis.from_url(server.url, socket_timeout=600)
        try:
            rows = asyncio.run(run(args, server.url, client))
        finally:
            client.close()
    print(f"{'phase':<52} {'longest script':>22} {'LATENCY':>8} {'PING':>8} {'wall':>7}  note")
    for r in rows:
        worst = f"{r['worst']} {r['worst_ms']:.1f} ms"
        print(f"{r['phase']:<52} {worst:>22} {r['latency_max_ms']:>5} ms "
              f"{r['ping_max_ms']:>5.1f} ms {r['wall_s']:>6.2f}s  {r['note']}")  # fmt: skip
    for r in rows:
        for name, f in r["scripts"].items():
            print(f"  {r['phase']}: {name} x{f['calls']:,}: median {f['median_ms']} ms, "
                  f"p99 {f['p99_ms']} ms, max {f['max_ms']} ms")  # fmt: skip
    ok = all(r["worst_ms"] < TARGET_MS for r in rows[1:])
    print(f"every script under {TARGET_MS:.0f} ms: {'yes' if ok else 'NO'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"target_ms": TARGET_MS, "phases": rows}, fh, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
