"""Grid-wide logs: records from several processes reach the capped stream and read back."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
import redis
from typer.testing import CliRunner

from pygirder.cli.logs import app as logs_app
from pygirder.observe.logs import (
    GridLogHandler,
    current_request_id,
    follow_logs,
    install_grid_logging,
    read_logs,
)
from pygirder.store.keys import LOG_STREAM_MAXLEN, Keys

NS = "logtest"


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def grid_logger(redis_url: str) -> Iterator[tuple[logging.Logger, GridLogHandler]]:
    """A private logger (not the root: pytest has its own handlers there) with a handler."""
    logger = logging.getLogger(f"test.grid.{time.monotonic_ns()}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = GridLogHandler(redis_url, NS, process_id="tester")
    logger.addHandler(handler)
    yield logger, handler
    logger.removeHandler(handler)
    handler.close()


CHILD = textwrap.dedent(
    """
    import logging, sys
    from pygirder.observe.logs import current_request_id, install_grid_logging
    url, ns, pid = sys.argv[1:4]
    install_grid_logging(url, ns, level="INFO", process_id=pid)
    log = logging.getLogger("child")
    log.debug("not sent: below the level")
    for i in range(3):
        token = current_request_id.set(f"req-{pid}-{i}")
        log.info("step %d of %s", i, pid)
        current_request_id.reset(token)
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("failed in %s", pid)
    # no explicit flush: logging.shutdown() at exit must send what is queued
    """
)


def test_records_from_two_processes_reach_the_stream(redis_url: str, client: redis.Redis) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD, redis_url, NS, name])
        for name in ("alpha", "beta")
    ]
    for p in procs:
        assert p.wait(timeout=30) == 0

    entries = read_logs(client, NS, count=100)
    assert len(entries) == 8
    assert {e.process for e in entries} == {"alpha", "beta"}
    for name in ("alpha", "beta"):
        mine = [e for e in entries if e.process == name]
        assert [e.message for e in mine] == [
            f"step 0 of {name}",
            f"step 1 of {name}",
            f"step 2 of {name}",
            f"failed in {name}",
        ]
        assert [e.request for e in mine] == [f"req-{name}-{i}" for i in range(3)] + [""]
        assert "ZeroDivisionError" in mine[-1].exc
        assert all(e.host == socket.gethostname() and e.pid > 0 for e in mine)
        assert all(e.logger == "child" for e in mine)

    errors = read_logs(client, NS, level="ERROR")
    assert sorted(e.message for e in errors) == ["failed in alpha", "failed in beta"]
    one = read_logs(client, NS, request="req-beta-1")
    assert [e.message for e in one] == ["step 1 of beta"]
    prefix = read_logs(client, NS, request="req-alpha")
    assert len(prefix) == 3


def test_level_request_count_and_since_filters(grid_logger, client: redis.Redis) -> None:
    logger, handler = grid_logger
    for i in range(10):
        token = current_request_id.set("abc123" if i % 2 else "def456")
        logger.log(logging.WARNING if i % 3 == 0 else logging.DEBUG, "record %d", i)
        current_request_id.reset(token)
    assert handler.flush(timeout=5)

    everything = read_logs(client, NS, count=100)
    assert [e.message for e in everything] == [f"record {i}" for i in range(10)]
    assert [e.message for e in read_logs(client, NS, count=3)] == [
        "record 7",
        "record 8",
        "record 9",
    ]
    warnings = read_logs(client, NS, level=logging.WARNING)
    assert [e.message for e in warnings] == ["record 0", "record 3", "record 6", "record 9"]
    assert {e.level for e in warnings} == {"WARNING"}
    odd_warnings = read_logs(client, NS, level="warning", request="abc")
    assert [e.message for e in odd_warnings] == ["record 3", "record 9"]
    latest_two_odd = read_logs(client, NS, request="abc123", count=2)
    assert [e.message for e in latest_two_odd] == ["record 7", "record 9"]
    after = read_logs(client, NS, since=everything[6].id)
    assert [e.message for e in after] == ["record 7", "record 8", "record 9"]
    assert read_logs(client, NS, since=everything[0].time - 1) == everything
    assert read_logs(client, "other-namespace") == []


def test_follow_yields_only_new_records(grid_logger, client: redis.Redis) -> None:
    logger, handler = grid_logger
    logger.info("old")
    assert handler.flush(timeout=5)

    follower = follow_logs(client, NS, level="INFO", block_ms=200)
    logger.debug("filtered out")
    logger.info("new 1")
    token = current_request_id.set("r-42")
    logger.error("new 2")
    current_request_id.reset(token)
    handler.flush(timeout=5)

    first, second = next(follower), next(follower)
    assert (first.message, second.message) == ("new 1", "new 2")
    assert second.request == "r-42" and second.level == "ERROR"


def test_request_id_from_the_grid_workers_context(grid_logger, client: redis.Redis) -> None:
    context = pytest.importorskip("pygirder.grid.context")
    logger, handler = grid_logger
    token = context.current_request.set(
        context.RequestContext(worker=None, request_id="cafe01", function="f")
    )
    try:
        logger.info("inside a request")
    finally:
        context.current_request.reset(token)
    logger.info("outside")
    handler.flush(timeout=5)
    assert [(e.message, e.request) for e in read_logs(client, NS)] == [
        ("inside a request", "cafe01"),
        ("outside", ""),
    ]


def test_the_stream_is_capped(redis_url: str, client: redis.Redis) -> None:
    assert GridLogHandler.__init__.__kwdefaults__["maxlen"] == LOG_STREAM_MAXLEN
    logger = logging.getLogger("test.grid.capped")
    logger.propagate = False
    handler = GridLogHandler(redis_url, NS, maxlen=100)
    logger.addHandler(handler)
    try:
        for i in range(2000):
            logger.warning("record %d", i)
        assert handler.flush(timeout=10)
    finally:
        logger.removeHandler(handler)
        handler.close()
    length = client.xlen(Keys(NS).logs)
    # MAXLEN ~ trims whole stream nodes (100 entries by default), so a bit over 100.
    assert 100 <= length <= 300
    assert handler.sent == 2000 and handler.dropped == 0
    assert read_logs(client, NS, count=1)[0].message == "record 1999"


def test_unreachable_server_neither_raises_nor_blocks() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    logger = logging.getLogger("test.grid.unreachable")
    logger.propagate = False
    handler = GridLogHandler(f"redis://127.0.0.1:{port}/0", NS, max_queue=50)
    logger.addHandler(handler)
    try:
        started = time.monotonic()
        for i in range(5000):
            logger.error("nobody hears record %d", i)
        assert time.monotonic() - started < 2.0  # the caller never waits on the network
        handler.flush(timeout=3)
    finally:
        logger.removeHandler(handler)
        closing = time.monotonic()
        handler.close()
        assert time.monotonic() - closing < 6.0
    assert handler.sent == 0
    assert handler.dropped == 5000
    assert time.monotonic() - started < 10.0


def test_install_grid_logging_replaces_and_sets_level(redis_url: str, client) -> None:
    logger = logging.getLogger("test.grid.install")
    logger.propagate = False
    first = install_grid_logging(redis_url, NS, level="WARNING", process_id="p1", logger=logger)
    second = install_grid_logging(redis_url, NS, level="INFO", process_id="p2", logger=logger)
    try:
        assert [h for h in logger.handlers if isinstance(h, GridLogHandler)] == [second]
        assert logger.level == logging.INFO
        logger.info("hello")
        second.flush(timeout=5)
        assert [(e.process, e.message) for e in read_logs(client, NS)] == [("p2", "hello")]
    finally:
        logger.removeHandler(second)
        second.close()
        first.close()


def test_logs_command_prints_readable_lines(grid_logger, redis_url: str) -> None:
    logger, handler = grid_logger
    token = current_request_id.set("0123456789abcdef0123")
    logger.info("computing price")
    logger.warning("slow worker")
    current_request_id.reset(token)
    logger.error("disk full")
    handler.flush(timeout=5)

    runner = CliRunner()
    base = ["--redis", redis_url, "--namespace", NS]
    out = runner.invoke(logs_app, base)
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert len(lines) == 3
    assert "INFO" in lines[0] and "computing price" in lines[0]
    assert "[0123456789ab]" in lines[0] and "0123456789abc" not in lines[0]
    assert f"tester@{socket.gethostname()}:" in lines[0]

    out = runner.invoke(logs_app, [*base, "--level", "warning"])
    assert [line.split()[2] for line in out.stdout.splitlines()] == ["WARNING", "ERROR"]
    out = runner.invoke(logs_app, [*base, "--request", "0123456789ab", "-n", "1"])
    assert out.stdout.count("\n") == 1 and "slow worker" in out.stdout
    out = runner.invoke(logs_app, [*base, "--level", "LOUD"])
    assert out.exit_code == 2


def test_logs_command_reports_an_unreachable_server() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = CliRunner().invoke(logs_app, ["--redis", f"redis://127.0.0.1:{port}/0"])
    assert out.exit_code == 1
    assert "cannot reach" in out.stderr and "Traceback" not in out.output
