"""A worker process holds a fixed set of server connections: under load it neither
opens more nor reconnects (each new connection costs the server HELLO and CLIENT
SETINFO, and a fleet of a thousand workers would hold every one it ever opened)."""

from __future__ import annotations

import time

import psutil

import gridfuncs as gf


def _server_sockets(pid: int, port: int) -> set[tuple[str, int]]:
    return {
        c.laddr
        for c in psutil.Process(pid).net_connections("tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    }


def test_a_busy_worker_keeps_its_connections(grid_factory, valkey_server, monkeypatch):
    # a short heartbeat: the beat, the reaper and the work overlap all the time
    monkeypatch.setenv("PYGIRDER_HEARTBEAT_TTL", "1")
    grid = grid_factory(workers=1)
    (pid,) = grid.worker_pids()
    port = int(valkey_server.url.rsplit(":", 1)[1].split("/")[0])
    time.sleep(0.5)  # past start-up: the log stream's connection opens at the first record
    before = _server_sockets(pid, port)
    deadline = time.monotonic() + 3.0
    rounds = 0
    while time.monotonic() < deadline:
        grid.map(gf.add, [(rounds, i) for i in range(300)])
        assert grid.run(gf.chain(30)) == 30  # nested waits: parked requests, the inbox
        rounds += 1
    after = _server_sockets(pid, port)
    assert after == before, f"opened {len(after - before)}, closed {len(before - after)}"
    assert len(after) <= 4  # commands, the blocking take, the inbox, the log stream
