"""B9, the scale model: what one Valkey node spends per worker, and how far it goes.

    python bench/scale.py [--seconds 10] [--fleet 100,300,1000] [--json FILE]

1. Per worker: one real ``pygirder worker`` on a private Valkey, idle and then busy
   (a client keeps it fed with empty calls): commands per second it sends (counted
   with MONITOR: commands its scripts run are not counted), server CPU per second
   (``INFO cpu``, MONITOR off), and the connections it holds and opens.
2. The fleet: N simulated idle workers (lightweight protocol clients in one asyncio
   process, each with a worker's three connections, issuing what an idle worker
   issues: the TAKE script and a 1 s BLMOVE in turn, a heartbeat, registration and
   reaper-lock attempt every TTL/4, a 5 s inbox BLMPOP) beside a real job: two real
   workers and a client running fan-outs of empty calls.  Reported per N: server
   CPU, the p99 latency of the simulated workers' TAKE scripts, and the job's
   throughput.  From the per-worker costs: the largest fleet at 50 % of one core.

The simulated workers serve a pool of their own: their blocking takes must not
swallow the job's calls.  They register in the grid's worker table and heartbeat, so
the real workers' reaper reads all of them, as it would in a real fleet.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
from typing import Any

import harness
import redis

import pygirder
from pygirder.server import EmbeddedServer
from pygirder.settings import liveness
from pygirder.store import scripts
from pygirder.store.keys import Keys

NAMESPACE = "scale"
SIM_POOL = "simulated"


# -- the server's view ------------------------------------------------------------------
def server_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def connections(client: redis.Redis) -> int:
    return int(client.info("stats")["total_connections_received"])


def monitor_commands(url: str, seconds: float, only: set[str]) -> dict[str, int]:
    """Commands the connections ``only`` (addresses) sent during ``seconds``, by name
    (MONITOR; the commands their scripts run are not counted)."""
    client = redis.Redis.from_url(url)
    counts: dict[str, int] = {}
    with client.monitor() as mon:
        deadline = time.monotonic() + seconds
        for event in mon.listen():
            if time.monotonic() > deadline:
                break
            if f"{event.get('client_address')}:{event.get('client_port')}" not in only:
                continue
            raw = event.get("command", "")
            name = raw.split(" ", 1)[0].lower() if raw else "?"
            counts[name] = counts.get(name, 0) + 1
    client.close()
    return counts


# -- one real worker ----------------------------------------------------------------------
def spawn_worker(url: str, pool: str = "default") -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "pygirder", "worker", "--redis", url, "--namespace", NAMESPACE,
           "--pool", pool, "--import", "tasks_pygirder", "--log-level", "WARNING"]  # fmt: skip
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=harness.bench_env())


class Feeder:
    """A client thread that keeps the grid busy with fan-outs of empty calls."""

    def __init__(self, grid: pygirder.Grid, batch: int = 500) -> None:
        import tasks_pygirder as tp

        self.grid, self.batch, self.fn = grid, batch, tp.noop
        self.calls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            salt = harness.new_salt()
            self.grid.map(self.fn, [(salt, i) for i in range(self.batch)], timeout=120)
            self.calls += self.batch

    def __enter__(self) -> Feeder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)


def script_latency(client: redis.Redis) -> dict[str, float]:
    """The server's own time per EVALSHA since the last CONFIG RESETSTAT (latency
    tracking): what a script costs the node, queueing aside."""
    raw = client.info("latencystats").get("latency_percentiles_usec_evalsha")
    if not raw:
        return {}
    if isinstance(raw, str):
        raw = dict(kv.split("=") for kv in raw.split(","))
    return {f"evalsha_{k.replace('.', '_')}_us": float(v) for k, v in raw.items()}


def per_worker(url: str, seconds: float) -> dict[str, Any]:
    admin = redis.Redis.from_url(url)
    cpu, t0 = server_cpu(admin), time.monotonic()
    time.sleep(seconds)
    alone_ms = (server_cpu(admin) - cpu) / (time.monotonic() - t0) * 1000
    proc = spawn_worker(url)
    try:
        grid = pygirder.connect(url, workers=0, namespace=NAMESPACE)
        grid.wait_for_workers(1, timeout=60)
        time.sleep(2.0)  # past start-up
        out: dict[str, Any] = {"server_alone_cpu_ms_per_s": round(alone_ms, 2)}
        for state in ("idle", "busy"):
            feeder = Feeder(grid) if state == "busy" else None
            if feeder:
                feeder.__enter__()
                time.sleep(1.0)
            opened, cpu, t0 = connections(admin), server_cpu(admin), time.monotonic()
            calls0 = feeder.calls if feeder else 0
            time.sleep(seconds)
            dt = time.monotonic() - t0
            cpu_s = (server_cpu(admin) - cpu) / dt
            new_conns = connections(admin) - opened
            calls = ((feeder.calls if feeder else 0) - calls0) / dt
            worker_addrs = worker_connections(admin, proc.pid)
            cmds = monitor_commands(url, seconds, only=worker_addrs)
            if feeder:
                feeder.__exit__()
            out[state] = {
                "commands_per_s": round(sum(cmds.values()) / seconds, 2),
                "commands": {k: round(v / seconds, 2) for k, v in sorted(cmds.items())},
                "server_cpu_ms_per_s": round(cpu_s * 1000 - alone_ms, 2),
                "connections_held": len(worker_addrs),
                "connections_opened_per_s": round(new_conns / dt, 3),
                "calls_per_s": round(calls, 1),
            }
        grid.close()
        return out
    finally:
        proc.terminate()
        proc.wait(60)
        admin.close()


def worker_connections(admin: redis.Redis, pid: int) -> set[str]:
    """Addresses of the connections the process ``pid`` holds (by its sockets' ports)."""
    import psutil

    ports = {c.laddr.port for c in psutil.Process(pid).net_connections("tcp") if c.raddr}
    return {c["addr"] for c in admin.client_list() if int(c["addr"].rsplit(":", 1)[1]) in ports}


# -- lightweight protocol clients ------------------------------------------------------------
class Resp:
    """One RESP2 connection: send a command, read its reply.  No pooling, no retries."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.lock = asyncio.Lock()  # one command at a time, as on a worker's connection
        self.sent = 0

    @classmethod
    async def open(cls, host: str, port: int, password: str | None) -> Resp:
        conn = cls(*await asyncio.open_connection(host, port))
        if password:
            await conn.call("AUTH", password)
        return conn

    async def call(self, *args: Any) -> Any:
        out = [f"*{len(args)}\r\n".encode()]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            out += [f"${len(b)}\r\n".encode(), b, b"\r\n"]
        async with self.lock:
            self.sent += 1
            self.writer.write(b"".join(out))
            return await self._reply()

    async def _reply(self) -> Any:
        line = await self.reader.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = await self.reader.readexactly(n + 2)
            return data[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [await self._reply() for _ in range(n)]
        raise RuntimeError(f"unexpected reply {line!r}")

    def close(self) -> None:
        self.writer.close()


class _Capture:
    """A script runner that runs nothing: it returns what it would send."""

    def run_script(self, script: Any, keys: list[Any], args: list[Any]) -> tuple[Any, ...]:
        return script, keys, args


class SimulatedWorker:
    """The command mix of an idle pygirder worker, on its three connections."""

    def __init__(self, i: int, keys: Keys, shas: dict[str, str], ttl: float) -> None:
        self.id = f"worker-sim-{i}-{os.getpid()}"
        self.keys, self.shas, self.ttl = keys, shas, ttl
        self.take_latencies: list[float] = []
        self.beaten = False
        self.conns: list[Resp] = []

    def sent(self) -> int:
        return sum(c.sent for c in self.conns)

    async def run(self, addr: tuple[str, int, str | None], stop: asyncio.Event) -> None:
        cmd, block, inbox = self.conns = [await Resp.open(*addr) for _ in range(3)]
        try:
            await self._beat(cmd)
            await asyncio.gather(self._take_loop(cmd, block, stop), self._beat_loop(cmd, stop),
                                 self._inbox_loop(inbox, stop))  # fmt: skip
        finally:
            for conn in (cmd, block, inbox):
                conn.close()

    async def _take_loop(self, cmd: Resp, block: Resp, stop: asyncio.Event) -> None:
        k = self.keys
        # the worker's TAKE, with the keys and arguments the grid's own helper gives it
        script, keys, args = scripts.take(_Capture(), k, pool=SIM_POOL, worker=self.id, max=16)
        await asyncio.sleep(random.random())
        while not stop.is_set():
            started = time.perf_counter()
            await cmd.call("EVALSHA", script.sha, len(keys), *keys, *args)
            self.take_latencies.append(time.perf_counter() - started)
            await block.call("BLMOVE", k.queue(SIM_POOL), k.inflight(self.id), "RIGHT", "LEFT", 1)

    async def _beat(self, cmd: Resp) -> None:
        k = self.keys
        await cmd.call("SET", k.heartbeat(self.id), 1, "PX", int(self.ttl * 1000), "GET")
        info = {"id": self.id, "host": "simulated", "pid": 0, "pool": SIM_POOL,
                "started": time.time(), "beat": time.time(), "state": "idle"}  # fmt: skip
        await cmd.call("HSET", k.workers, self.id, json.dumps(info))
        await cmd.call("INFO", "server")
        self.beaten = True

    async def _beat_loop(self, cmd: Resp, stop: asyncio.Event) -> None:
        every = self.ttl / 4
        await asyncio.sleep(random.random() * every)
        while not stop.is_set():
            await self._beat(cmd)
            # the reaper's lock attempt (another process holds it)
            if not await cmd.call("SET", self.keys.reaper_lock, self.id, "NX", "PX",
                                  int(every * 3000)):  # fmt: skip
                await cmd.call("GET", self.keys.reaper_lock)
            await asyncio.sleep(every)

    async def _inbox_loop(self, inbox: Resp, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await inbox.call("BLMPOP", 5, 1, self.keys.inbox(self.id), "LEFT", "COUNT", 64)


async def drive(addr: tuple[str, int, str | None], n: int, ttl: float, shas: dict[str, str],
                ready: threading.Event, done: threading.Event,
                shared: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Run ``n`` simulated workers; ``ready`` is set once all of them beat once, the
    measurement runs until ``done``."""
    keys = Keys(NAMESPACE)
    sims = shared["sims"] = [SimulatedWorker(i, keys, shas, ttl) for i in range(n)]
    stop = asyncio.Event()
    tasks = []
    for sim in sims:  # connect in small steps: a burst of 3,000 connects is not the point
        tasks.append(asyncio.create_task(sim.run(addr, stop)))
        await asyncio.sleep(0.001)
    while sum(s.beaten for s in sims) + sum(t.done() for t in tasks) < n:
        await asyncio.sleep(0.05)  # every one beat once (or failed, counted below)
    for sim in sims:
        sim.take_latencies.clear()
    ready.set()
    sent, t0 = sum(s.sent() for s in sims), time.monotonic()
    while not done.is_set():
        await asyncio.sleep(0.05)
    rate = (sum(s.sent() for s in sims) - sent) / (time.monotonic() - t0)
    stop.set()
    if tasks:
        await asyncio.wait(tasks, timeout=10)
    failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
    lat = sorted(x for s in sims for x in s.take_latencies)
    return {"take_p50_ms": round(harness.percentile(lat, 50) * 1e3, 3) if lat else None,
            "take_p99_ms": round(harness.percentile(lat, 99) * 1e3, 3) if lat else None,
            "takes": len(lat), "failed": len(failed), "sim_commands_per_s": round(rate, 1),
            "first_failure": repr(failed[0].exception()) if failed else None}  # fmt: skip


def fleet(url: str, sizes: list[int], seconds: float) -> list[dict[str, Any]]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    addr = (parts.hostname or "127.0.0.1", parts.port or 6379, parts.password)
    admin = redis.Redis.from_url(url)
    shas = {s.name: admin.script_load(s.source) for s in scripts.ALL}  # loaded up front
    procs = [spawn_worker(url) for _ in range(2)]
    grid = pygirder.connect(url, workers=0, namespace=NAMESPACE)
    rows = []
    try:
        grid.wait_for_workers(2, timeout=60)
        ttl = liveness().heartbeat_ttl
        for n in [0, *sizes]:
            box: dict[str, Any] = {}
            ready, done = threading.Event(), threading.Event()

            def run(n: int = n, box: dict[str, Any] = box, ready=ready, done=done) -> None:
                box.update(asyncio.run(drive(addr, n, ttl, shas, ready, done, box)))

            driver = threading.Thread(target=run, daemon=True)
            driver.start()
            ready.wait(300)
            time.sleep(1.0)

            def sent(box: dict[str, Any] = box) -> int:
                return sum(s.sent() for s in box["sims"])

            # the fleet alone, then beside the job
            cpu, cmds, t0 = server_cpu(admin), sent(), time.monotonic()
            time.sleep(seconds)
            dt = time.monotonic() - t0
            row = {"simulated_workers": n,
                   "quiet_server_cpu_pct": round((server_cpu(admin) - cpu) / dt * 100, 2),
                   "quiet_sim_commands_per_s": round((sent() - cmds) / dt, 1)}  # fmt: skip
            with Feeder(grid) as feeder:
                time.sleep(1.0)
                admin.config_resetstat()
                cpu, calls, t0 = server_cpu(admin), feeder.calls, time.monotonic()
                row["connections"] = int(admin.info("clients")["connected_clients"])
                time.sleep(seconds)
                dt = time.monotonic() - t0
                row.update({"server_cpu_pct": round((server_cpu(admin) - cpu) / dt * 100, 1),
                            "job_calls_per_s": round((feeder.calls - calls) / dt, 1),
                            **script_latency(admin)})  # fmt: skip
            done.set()
            driver.join(60)
            box.pop("sims", None)
            row.update(box)
            row["load_avg"] = round(os.getloadavg()[0], 2)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            admin.hdel(Keys(NAMESPACE).workers, *[f"worker-sim-{i}-{os.getpid()}" for i in
                                                  range(n)] or ["-"])  # fmt: skip
    finally:
        grid.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(60)
        admin.close()
    return rows


def capacity(per: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Workers one node serves at 50 % of a core, from the per-worker costs.

    The server's CPU with the simulated fleet alone (less that without it), divided by
    the commands the simulated workers sent, is the cost of an idle worker's command
    (the median over the fleet sizes), times the commands an idle worker sends."""
    busy = per["busy"]
    per_call_us = busy["server_cpu_ms_per_s"] / max(busy["calls_per_s"], 1) * 1000
    idle_cmds = per["idle"]["commands_per_s"]
    # the baseline: the job's two workers and client, idle, with no simulated fleet
    base = [r["quiet_server_cpu_pct"] * 10 for r in rows if not r["simulated_workers"]]
    alone_ms = base[0] if base else per["server_alone_cpu_ms_per_s"]
    per_cmd = sorted(
        (r["quiet_server_cpu_pct"] * 10 - alone_ms) * 1000 / r["quiet_sim_commands_per_s"]
        for r in rows
        if r["simulated_workers"] and r.get("quiet_sim_commands_per_s")
    )
    us_per_cmd = max(per_cmd[len(per_cmd) // 2], 0.0) if per_cmd else None
    idle_ms = us_per_cmd * idle_cmds / 1000 if us_per_cmd else per["idle"]["server_cpu_ms_per_s"]
    return {
        "idle_worker_server_ms_per_s": per["idle"]["server_cpu_ms_per_s"],
        "simulated_us_per_command": round(us_per_cmd, 2) if us_per_cmd else None,
        "idle_worker_model_ms_per_s": round(idle_ms, 3),
        "server_us_per_call": round(per_call_us, 1),
        "max_idle_workers_at_50pct": int(500 / max(idle_ms, 1e-6)),
        "max_calls_per_s_at_50pct": int(500_000 / max(per_call_us, 1e-6)),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--fleet", default="100,300,1000")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.fleet.split(",") if x]
    clients = max(10_000, 4 * max(sizes, default=0) + 100)
    server = EmbeddedServer(extra_args=["--maxclients", str(clients)]).start()
    try:
        per = per_worker(server.url, args.seconds)
        print(json.dumps(per, indent=1), file=sys.stderr, flush=True)
        rows = fleet(server.url, sizes, args.seconds)
    finally:
        server.stop()
    report = {"per_worker": per, "fleet": rows, "capacity": capacity(per, rows),
              "load_avg": os.getloadavg(), "cpus": os.cpu_count()}  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    print(json.dumps(report["capacity"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
