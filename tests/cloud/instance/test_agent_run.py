"""``agent run``: supervision, spot interruption, time-to-live, signals, and the role commands.

The supervision is tested with a real short-lived child process standing in for the
grid service (``run_service(command=...)``); the redis role runs the real
``pygirder server`` with its password from SSM.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pygirder.cloud.errors import AgentError
from pygirder.cloud.instance import agent, supervisor
from pygirder.cloud.instance.agent import RunOptions, run_service
from pygirder.cloud.instance.common import Role
from pygirder.cloud.instance.supervisor import (
    Supervisor,
    alive_for,
    service_command,
    service_environment,
    with_password,
)

CHILD = r"""
import os, signal, sys, time
from pathlib import Path

state, mode = Path(sys.argv[1]), sys.argv[2]
starts = state / "starts"
n = int(starts.read_text()) + 1 if starts.exists() else 1
starts.write_text(str(n))
if mode.startswith("crash"):
    if n <= int(mode[len("crash"):]):
        sys.exit(3)

def on_term(signum, frame):
    (state / "terminated").write_text(str(os.getpid()))
    sys.exit(0)

signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn" else on_term)
(state / "running").write_text(str(os.getpid()))
while True:
    time.sleep(0.02)
"""


def child(state: Path, mode: str = "ok") -> list[str]:
    """A stand-in service: counts its starts, records SIGTERM, optionally crashes first."""
    state.mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-c", CHILD, str(state), mode]


def _wait(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _options(status, **overrides) -> RunOptions:
    values = dict(
        role=Role.WORKER, topic_arn=status.topic_arn, launch_id="L-run", fleet="f-1",
        redis="redis://127.0.0.1:1/0", spot_interval_s=0.2, ready_grace_s=0.3,
        stop_timeout_s=5.0,
    )  # fmt: skip
    values.update(overrides)
    return RunOptions(**values)


def _in_thread(fn) -> tuple[threading.Thread, list]:
    outcome: list = []

    def target() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


# -- spot interruption and time-to-live ---------------------------------------------------
def test_spot_notice_sigterms_the_child_and_announces_going_away(imds, status, tmp_path) -> None:
    state = tmp_path / "child"
    opts = _options(status, launch_id="L-spot")
    thread, outcome = _in_thread(
        lambda: run_service(opts, command=child(state), handle_signals=False)
    )
    ready, _ = status.wait_for("ready")
    assert (ready.launch_id, ready.role, ready.instance_id) == (
        "L-spot",
        "worker",
        imds.instance_id,
    )
    when = imds.raise_spot_interruption("terminate", in_seconds=120)
    thread.join(20)
    assert outcome == [0]
    assert (state / "terminated").read_text() == (state / "running").read_text()
    going, _ = status.wait_for("going-away")
    assert going.detail == f"spot interruption notice: terminate at {when}"
    assert (state / "starts").read_text() == "1", "a stopped service must not be restarted"


def test_a_rebalance_recommendation_is_announced_and_the_service_serves_on(
    imds, status, tmp_path
) -> None:
    state = tmp_path / "child"
    opts = _options(status, launch_id="L-rebalance")
    thread, outcome = _in_thread(
        lambda: run_service(opts, command=child(state), handle_signals=False)
    )
    status.wait_for("ready")
    when = imds.recommend_rebalance()
    at_risk, _ = status.wait_for("rebalance")
    assert at_risk.detail == f"rebalance recommendation at {when}"
    assert at_risk.instance_id == imds.instance_id
    time.sleep(1.0)  # five more spot checks: still serving, announced once
    assert thread.is_alive() and not (state / "terminated").exists()
    imds.raise_spot_interruption("terminate", in_seconds=120)
    thread.join(20)
    assert outcome == [0]
    going, seen = status.wait_for("going-away")
    assert going.detail.startswith("spot interruption notice")
    assert [a.event for a in seen] == ["going-away"]  # no second rebalance announcement
    assert (state / "terminated").exists()


def test_on_demand_instances_do_not_watch_for_spot_notices(status, tmp_path, monkeypatch) -> None:
    from pygirder.cloud.sim.imds import ImdsEmulator

    with ImdsEmulator(lifecycle="on-demand") as emulator:
        monkeypatch.setenv("PYGIRDER_IMDS_ENDPOINT", emulator.url)
        opts = _options(status, expires=datetime.now(UTC) + timedelta(seconds=1.5),
                        shutdown_command="true")  # fmt: skip
        emulator.raise_spot_interruption()
        assert run_service(opts, command=child(tmp_path / "c"), handle_signals=False) == 0
    events = [a.event for a in status.receive(2)]
    assert events == ["ready", "going-away"]


def test_ttl_announces_going_away_stops_the_child_and_shuts_down(imds, status, tmp_path) -> None:
    state, marker = tmp_path / "child", tmp_path / "shut-down"
    expires = datetime.now(UTC) + timedelta(seconds=1.5)
    opts = _options(status, expires=expires, shutdown_command=f"touch {marker}")
    assert run_service(opts, command=child(state), handle_signals=False) == 0
    assert datetime.now(UTC) >= expires
    assert marker.exists()
    assert (state / "terminated").exists()
    going, seen = status.wait_for("going-away")
    assert going.detail.startswith("time-to-live ran out at ")
    assert [a.event for a in seen] == ["ready", "going-away"]


def test_an_expired_ttl_shuts_down_at_once(imds, status, tmp_path) -> None:
    state, marker = tmp_path / "child", tmp_path / "shut-down"
    opts = _options(status, expires=datetime.now(UTC) - timedelta(seconds=5),
                    shutdown_command=f"touch {marker}")  # fmt: skip
    assert run_service(opts, command=child(state), handle_signals=False) == 0
    assert marker.exists()
    assert not (state / "starts").exists(), "no service starts after the time-to-live"
    [going] = status.receive(1)
    assert going.event == "going-away"


def test_the_default_shutdown_is_never_run_on_a_simulated_instance(
    imds, monkeypatch, caplog
) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError(f"must not run {args}")

    monkeypatch.setattr(supervisor.subprocess, "run", refuse)
    with caplog.at_level(logging.WARNING, logger="pygirder.agent"):
        assert agent.shut_down(None) == 0
    assert "simulated instance" in caplog.text


def test_ttl_and_expires_are_parsed_strictly() -> None:
    assert agent.resolve_expiry(None, "2030-01-02T03:04:05Z") == datetime(
        2030, 1, 2, 3, 4, 5, tzinfo=UTC
    )
    soon = agent.resolve_expiry(60, None)
    assert soon is not None and 55 < (soon - datetime.now(UTC)).total_seconds() <= 60
    with pytest.raises(agent.ConfigError, match="not both"):
        agent.resolve_expiry(60, "2030-01-01T00:00:00Z")
    with pytest.raises(agent.ConfigError, match="not an ISO time"):
        agent.resolve_expiry(None, "tomorrow")


def test_sigterm_to_the_agent_is_forwarded_to_the_child(imds, status, tmp_path) -> None:
    state = tmp_path / "child"
    timer = threading.Thread(
        target=lambda: (
            _wait(lambda: (state / "running").exists(), what="child start"),
            os.kill(os.getpid(), signal.SIGTERM),
        ),
        daemon=True,
    )
    timer.start()
    before = signal.getsignal(signal.SIGTERM)
    assert run_service(_options(status), command=child(state), handle_signals=True) == 0
    assert signal.getsignal(signal.SIGTERM) is before
    assert (state / "terminated").exists()
    going, _ = status.wait_for("going-away")
    assert going.detail == "agent received SIGTERM"


# -- supervision -----------------------------------------------------------------------
def test_a_crashing_child_is_restarted_with_backoff(tmp_path) -> None:
    state = tmp_path / "child"
    ready = []
    supervisor = Supervisor(
        child(state, "crash2"), ready_probe=alive_for(0.2), on_ready=lambda: ready.append(1),
        backoff_base_s=0.05, max_restarts=3,
    )  # fmt: skip
    thread, outcome = _in_thread(supervisor.run)
    _wait(lambda: ready == [1], what="ready")
    supervisor.stop("test over")
    thread.join(10)
    assert outcome == [None]
    assert supervisor.starts == 3
    assert (state / "starts").read_text() == "3"
    assert supervisor.stop_reason == "test over"


def test_the_supervisor_gives_up_after_repeated_quick_failures(tmp_path) -> None:
    supervisor = Supervisor(child(tmp_path / "c", "crash99"), backoff_base_s=0.01, max_restarts=2)
    with pytest.raises(AgentError, match=r"failed 3 times in a row \(last exit status 3"):
        supervisor.run()
    assert supervisor.starts == 3


def test_a_child_that_ignores_sigterm_is_killed(tmp_path) -> None:
    state = tmp_path / "child"
    supervisor = Supervisor(child(state, "stubborn"), stop_timeout_s=0.5)
    thread, outcome = _in_thread(supervisor.run)
    _wait(lambda: (state / "running").exists(), what="child start")
    pid = int((state / "running").read_text())
    started = time.monotonic()
    supervisor.stop("test over")
    thread.join(10)
    assert outcome == [None]
    assert 0.4 < time.monotonic() - started < 5
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# -- roles -------------------------------------------------------------------------------
def test_role_command_lines_hold_no_password() -> None:
    python = sys.executable
    assert service_command("redis", bind="10.0.1.5", password_file="/run/pw") == [
        python, "-m", "pygirder", "server", "--bind", "10.0.1.5", "--port", "6379",
        "--password-file", "/run/pw",
    ]  # fmt: skip
    assert service_command("distributor", pool="rack-1", parent="zone-a") == [
        python, "-m", "pygirder", "distributor", "--pool", "rack-1", "--parent", "zone-a",
    ]  # fmt: skip
    assert service_command("worker", pool="big", imports=["jobs", "more.jobs"]) == [
        python, "-m", "pygirder", "worker", "--pool", "big", "--processes", "auto",
        "--import", "jobs", "--import", "more.jobs",
    ]  # fmt: skip
    with pytest.raises(agent.ConfigError, match="--parent"):
        service_command("distributor")
    assert service_environment("worker", "redis://10.0.1.5:6379/0", "p@ss/w:rd") == {
        "PYGIRDER_REDIS": "redis://:p%40ss%2Fw%3Ard@10.0.1.5:6379/0"
    }
    assert service_environment("redis", None, "secret") == {}
    with pytest.raises(agent.ConfigError, match="needs --redis"):
        service_environment("worker", None, "secret")
    assert with_password("10.0.1.5:6379", None) == "10.0.1.5:6379"
    assert with_password("10.0.1.5:6379", "x") == "redis://:x@10.0.1.5:6379/0"


@pytest.fixture
def redis_password(aws) -> str:
    import boto3

    password = f"correct-horse-battery-staple-{os.getpid()}"
    boto3.client("ssm").put_parameter(
        Name=agent.redis_password_parameter("demo", "f-1"), Value=password, Type="SecureString"
    )
    return password


def test_the_redis_password_comes_from_ssm(redis_password) -> None:
    assert agent.read_redis_password("demo", "f-1") == redis_password
    with pytest.raises(AgentError, match="ssm:GetParameter"):
        agent.read_redis_password("demo", "no-such-fleet")


def test_a_worker_gets_its_redis_url_with_password_in_its_environment(
    imds, status, redis_password
) -> None:
    seen: list[Supervisor] = []

    def inspect(supervisor: Supervisor) -> None:
        seen.append(supervisor)
        supervisor.stop("inspected")  # never start the real worker here

    opts = _options(status, name="demo", redis="redis://10.0.1.5:6379/0", imports=("jobs",))
    assert run_service(opts, handle_signals=False, supervisor_hook=inspect) == 0
    [supervisor] = seen
    assert supervisor.starts == 0
    assert redis_password not in " ".join(supervisor.command)
    assert supervisor.command[1:] == [
        "-m", "pygirder", "worker", "--pool", "default", "--processes", "auto", "--import", "jobs",
    ]  # fmt: skip
    assert supervisor.env["PYGIRDER_REDIS"] == f"redis://:{redis_password}@10.0.1.5:6379/0"


def _no_retry():
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return Retry(NoBackoff(), 0)


NO_RETRY = _no_retry()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_redis_role_serves_with_the_ssm_password(imds, status, redis_password, caplog) -> None:
    import redis

    port = _free_port()
    supervisors: list[Supervisor] = []
    opts = _options(status, role=Role.REDIS, name="demo", redis=None, port=port)
    with caplog.at_level(logging.DEBUG, logger="pygirder"):
        thread, outcome = _in_thread(
            lambda: run_service(opts, handle_signals=False, supervisor_hook=supervisors.append)
        )
        try:
            ready, _ = status.wait_for("ready", timeout=30)
            assert ready.role == "redis"
            client = redis.Redis(host="127.0.0.1", port=port, password=redis_password)
            assert client.ping()
            client.close()
            anonymous = redis.Redis(host="127.0.0.1", port=port, retry=NO_RETRY)
            with pytest.raises(redis.AuthenticationError):
                anonymous.ping()
            anonymous.close()
            pid = supervisors[0].pid
            assert pid is not None
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
            assert redis_password not in cmdline
        finally:
            supervisors[0].stop("test over")
            thread.join(20)
    assert outcome == [0]
    password_file = Path(
        supervisors[0].command[supervisors[0].command.index("--password-file") + 1]
    )
    assert not password_file.exists(), "the password file must go with the agent"
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("pygirder")]
    assert any("starting" in line and "--password-file" in line for line in ours)
    assert not any(redis_password in line for line in ours)
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host="127.0.0.1", port=port, retry=NO_RETRY).ping()


def test_agent_run_cli_reports_bad_options(imds) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pygirder.cloud.instance.agent", "run", "distributor",
         "--topic-arn", "arn:aws:sns:us-east-1:123456789012:t", "--launch-id", "L",
         "--redis", "redis://127.0.0.1:1/0", "--ttl", "60", "--expires", "2030-01-01T00:00:00Z"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "give --ttl or --expires, not both" in proc.stderr


def test_a_worker_runs_the_real_grid_worker_and_stops_on_a_spot_notice(
    imds, status, redis_url
) -> None:
    import redis

    from pygirder.store.keys import Keys

    supervisors: list[Supervisor] = []
    opts = _options(status, redis=redis_url, imports=("json",), ready_grace_s=1.0)
    thread, outcome = _in_thread(
        lambda: run_service(opts, handle_signals=False, supervisor_hook=supervisors.append)
    )
    try:
        status.wait_for("ready", timeout=30)
        client = redis.Redis.from_url(redis_url)
        _wait(lambda: client.hlen(Keys().workers) > 0, timeout=20, what="a worker")
        client.close()
        imds.raise_spot_interruption()
        status.wait_for("going-away", timeout=20)
        thread.join(30)
    finally:
        if thread.is_alive():
            supervisors[0].stop("test over")
            thread.join(30)
    assert outcome == [0]
    assert supervisors[0].starts == 1


def test_a_killed_worker_under_the_agent_is_requeued_at_once(
    imds, status, redis_url, tmp_path, monkeypatch
) -> None:
    # With a 300 s heartbeat TTL only the agent's own requeue, when it reaps its dead
    # child, lets the call finish within the test's time-outs.
    import pygirder

    tests = str(Path(__file__).resolve().parents[2])
    monkeypatch.syspath_prepend(tests)
    monkeypatch.setenv("PYTHONPATH", tests)
    monkeypatch.setenv("PYGIRDER_HEARTBEAT_TTL", "300")
    import gridfuncs as gf

    pool = f"agent-{os.getpid()}"
    supervisors: list[Supervisor] = []
    opts = _options(status, redis=redis_url, imports=("gridfuncs",), pool=pool, processes="1",
                    ready_grace_s=1.0)  # fmt: skip
    thread, outcome = _in_thread(
        lambda: run_service(opts, handle_signals=False, supervisor_hook=supervisors.append)
    )
    grid = pygirder.connect(redis_url, workers=0, pool=pool)
    log, gate = str(tmp_path / "exec.log"), tmp_path / "gate"
    try:
        future = grid.submit(gf.gated_pid(2, str(gate), log))
        started = lambda: [t for t in gf.count(log) if t.startswith("pid:")]  # noqa: E731
        _wait(lambda: len(started()) == 1, timeout=60, what="the call to start")
        victim = int(started()[0].split(":")[1])
        assert victim == supervisors[0].pid  # the agent's child is the worker itself
        os.kill(victim, signal.SIGKILL)
        _wait(lambda: len(started()) == 2, timeout=60, what="the call to run again")
        gate.touch()
        assert future.result(timeout=60) == 20
        assert supervisors[0].starts == 2
        assert grid.stats().get("dead_workers", 0) == 1
    finally:
        grid.close()
        if supervisors:
            supervisors[0].stop("test over")
        thread.join(30)
    assert outcome == [0]
