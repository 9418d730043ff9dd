"""The grid runs on a Redis Cluster node: every key a script touches is in one slot.

A valkey-server in cluster mode, alone and owning all 16,384 slots, refuses a script
(one that starts with ``#!lua``) the moment it touches a key of another slot than the
keys it declared.  A real grid workload against it, through a plain client, therefore
fails if any key of a namespace lacks the namespace's hash tag or a script builds a key
outside the schema.  The server's command statistics tell whether any script failed
(a worker logs and retries some failures, e.g. of sharing, instead of raising them).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import gridfuncs as gf
import hostilefuncs as hf
import pygirder
from pygirder.grid.maintenance import collect_garbage
from pygirder.observe.status import collect_status
from pygirder.server import EmbeddedServer, random_password
from pygirder.store import scripts
from pygirder.store.keys import Keys

TESTS = Path(__file__).resolve().parents[1]


def start_cluster_node(tmp: Path) -> EmbeddedServer:
    """A cluster-mode valkey-server that owns every slot, with ``cluster_state:ok``."""
    cluster = ["--cluster-enabled", "yes", "--cluster-config-file", str(tmp / "nodes.conf")]
    server = EmbeddedServer(password=random_password(), dir=tmp, maxmemory=0, extra_args=cluster)
    server.start()
    client = redis.Redis.from_url(server.url)
    try:
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 30
        while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "the cluster node never reached state ok"
            time.sleep(0.05)
    finally:
        client.close()
    return server


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory) -> Iterator[str]:
    server = start_cluster_node(tmp_path_factory.mktemp("cluster"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def client(cluster_url) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(cluster_url)
    c.config_resetstat()
    yield c
    c.close()


def poll(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def script_errors(client: redis.Redis) -> int:
    """Script calls that failed, but for NOSCRIPT (a process's first call of a script,
    answered by loading it).  A plain count of ERR replies would not do: every new
    connection of redis-py counts one (its handshake probes the server)."""
    stats = client.info("commandstats")
    failed = sum(stats.get(name, {}).get("failed_calls", 0)
                 for name in ("cmdstat_evalsha", "cmdstat_eval"))  # fmt: skip
    noscript = client.info("errorstats").get("errorstat_NOSCRIPT", {}).get("count", 0)
    return failed - noscript


def test_the_node_refuses_a_script_that_leaves_its_slot(client):
    """The check the workload relies on: a ``#!lua`` script is held to one slot, even
    for keys it does not declare; one in compatibility mode (no shebang) is not."""
    touch = "redis.call('SET', KEYS[1], 1) redis.call('SET', ARGV[1], 1) return 1"
    same, other = "pg:{a}:x", "pg:{a}:y"
    assert client.eval("#!lua\n" + touch, 1, same, other) == 1
    with pytest.raises(redis.ResponseError, match="do not hash to the same slot"):
        client.eval("#!lua\n" + touch, 1, same, "pg:{b}:y")
    assert client.eval(touch, 1, same, "pg:{b}:y") == 1  # compatibility mode: unchecked
    assert all(s.source.startswith("#!lua\n") for s in scripts.ALL)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_grid_workload_runs_on_a_cluster_node(cluster_url, client, monkeypatch):
    monkeypatch.setenv("PYGIRDER_HEARTBEAT_TTL", "1.0")
    monkeypatch.setenv("PYGIRDER_MAX_ATTEMPTS", "3")
    namespace = f"cluster-{uuid.uuid4().hex[:8]}"
    keys = Keys(namespace)
    with pygirder.connect(cluster_url, workers=2, namespace=namespace) as grid:
        # nested calls, depth first on a worker's stack and shared between the workers
        assert grid.run(gf.chaos_tree(3, 3, 0, 0.0), timeout=60) == 40
        assert grid.map(gf.add, [(i, 1) for i in range(300)]) == [i + 1 for i in range(300)]
        with pytest.raises(pygirder.RemoteError, match="bad input 1"):
            grid.run(gf.fail_level1(1), timeout=30)
        with pytest.raises(pygirder.RemoteError) as cycle:
            grid.run(gf.cyc_a(7), timeout=30)
        assert cycle.value.remote_type.endswith("GridCycleError")
        # a call over its max_runtime: the worker's watchdog fails it and hands back
        # the parked parent on a fresh connection before the process restarts
        with pytest.raises(pygirder.RemoteError, match="max_runtime"):
            grid.run(hf.waits_on_spin(1), timeout=45)
        # cancel: a call of a pool no worker serves has not started
        queued = grid.submit(gf.add.options(pool="nobody")(99, 1))
        assert queued.cancel()
        # a distributor volunteers its pool's idle workers to the parent pool "root"
        env = dict(os.environ, PYTHONPATH=str(TESTS))
        distributor = subprocess.Popen(
            [sys.executable, "-m", "pygirder", "distributor", "--pool", "default", "--parent",
             "root", "--redis", cluster_url, "--namespace", namespace],
            env=env, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            calls = [gf.add.options(pool="root")(i, 1000) for i in range(20)]
            assert grid.wait(calls, timeout=60) == [i + 1000 for i in range(20)]
        finally:
            distributor.terminate()
            distributor.wait(30)
        assert grid.stats().get("distributed", 0) >= 20

        # a worker killed mid-tree: the reaper requeues its work, nothing is lost
        result: dict[str, object] = {}
        tree = threading.Thread(
            target=lambda: result.update(n=grid.run(gf.chaos_tree(5, 3, 1, 0.01), 120)),
            daemon=True,
        )
        tree.start()
        time.sleep(1.0)
        os.kill(grid.worker_pids()[0], signal.SIGKILL)
        tree.join(120)
        assert result.get("n") == 364
        assert grid.stats().get("dead_workers", 0) >= 1
        assert grid.stats().get("requeued", 0) >= 1

        # a client that dies while it waits is withdrawn by the reaper
        code = (
            "import time, pygirder, gridfuncs as gf\n"
            f"g = pygirder.connect({cluster_url!r}, workers=0, namespace={namespace!r})\n"
            "f = g.submit(gf.add.options(pool='nobody')(5, 5))\n"
            "print(g.runtime.process_id, flush=True)\n"
            "time.sleep(120)\n"
        )
        dying = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE)
        try:
            assert dying.stdout is not None
            process = dying.stdout.readline().strip()
            poll(lambda: client.sismember(keys.waiting_processes, process), "the client waits")
        finally:
            dying.kill()
            dying.wait()
            if dying.stdout is not None:
                dying.stdout.close()
        poll(lambda: not client.sismember(keys.waiting_processes, process),
             "the dead client withdrawn")  # fmt: skip
        assert grid.stats().get("abandoned") == 1

        status = collect_status(client, namespace)
        assert status["stats"]["executed"] >= 300
        report = collect_garbage(client, namespace, older_than=0.0, dry_run=True)
        assert report.total > 0

    assert script_errors(client) == 0
    loaded = client.script_exists(*(s.sha for s in scripts.ALL))
    ran = {s.name for s, there in zip(scripts.ALL, loaded, strict=True) if there}
    assert ran == {s.name for s in scripts.ALL}, "a script the workload never ran"
