"""The service-CLI helper: shared options, --opts merging, the --json envelope, signals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from pygirder.cli.service import ServiceContext, load_options, service
from pygirder.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "service_example.py"
ENVELOPE_KEYS = {"result", "error", "time_s", "id", "log"}

app = typer.Typer()


@service(app)
def work(
    ctx: ServiceContext,
    n: int = 2,
    pool: str = "default",
    ratio: float = 0.5,
    fail: bool = False,
) -> dict:
    """A sync service that reports what it was given."""
    ctx.log.info("working on %d items in %s", n, pool)
    if fail:
        raise ValueError(f"cannot work on {n} items")
    return {"n": n, "pool": pool, "ratio": ratio, "id": ctx.id, "opts": ctx.opts}


@service(app, name="async-work")
async def async_work(ctx: ServiceContext, x: int = 1) -> list[int]:
    """An async service."""
    await asyncio.sleep(0.01)
    ctx.log.warning("doubling %d", x)
    return [x, 2 * x]


@service(app)
def text() -> str:
    """A service without a context parameter."""
    return "plain text"


@service(app)
def self_terminating(ctx: ServiceContext) -> str:
    """Sends itself SIGTERM, like a controller stopping it, and never returns otherwise."""
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
    return "not reached"


@service(app)
async def async_self_terminating(ctx: ServiceContext) -> str:
    os.kill(os.getpid(), signal.SIGTERM)
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        return f"cleaned up after {ctx.stop_signal}"
    return "not reached"


@service(app, stop="flag")
def draining(ctx: ServiceContext) -> dict:
    os.kill(os.getpid(), signal.SIGTERM)
    stopped = ctx.stopping.wait(5)
    return {"drained": stopped, "signal": ctx.stop_signal}


runner = CliRunner()


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args))


def envelope(result: Any) -> dict:
    """The one JSON line on stdout."""
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    data = json.loads(lines[0])
    assert set(data) == ENVELOPE_KEYS
    return data


def test_success_envelope() -> None:
    out = invoke("work", "--json", "--n", "3")
    assert out.exit_code == 0, out.output
    env = envelope(out)
    assert env["error"] is None
    assert env["result"]["n"] == 3 and env["result"]["pool"] == "default"
    assert env["result"]["opts"] == {"n": 3, "pool": "default", "ratio": 0.5, "fail": False}
    assert env["id"] == f"{socket.gethostname()}:{os.getpid()}"
    assert isinstance(env["time_s"], float) and 0 <= env["time_s"] < 5
    [record] = [r for r in env["log"] if r["logger"] == "work"]
    assert record["message"] == "working on 3 items in default"
    assert record["level"] == "INFO" and record["id"] == env["id"]


def test_id_is_in_envelope_and_every_log_record() -> None:
    env = envelope(invoke("work", "--json", "--id", "worker-7"))
    assert env["id"] == "worker-7" and env["result"]["id"] == "worker-7"
    assert env["log"] and all(r["id"] == "worker-7" for r in env["log"])


def test_log_level_filters_the_captured_records() -> None:
    env = envelope(invoke("work", "--json", "--log-level", "warning"))
    assert env["log"] == []
    env = envelope(invoke("async-work", "--json", "--log-level", "ERROR"))
    assert env["log"] == [] and env["result"] == [1, 2]


def test_user_error_envelope() -> None:
    out = invoke("work", "--json", "--fail", "--n", "4")
    assert out.exit_code == 1
    env = envelope(out)
    assert env["result"] is None
    assert env["error"]["type"] == "ValueError"
    assert env["error"]["message"] == "cannot work on 4 items"
    assert "Traceback" in env["error"]["traceback"] and "in work" in env["error"]["traceback"]
    assert any(r["message"].startswith("working on 4") for r in env["log"])


def test_user_error_without_json_is_one_line_on_stderr() -> None:
    out = invoke("work", "--fail", "--log-level", "WARNING")
    assert out.exit_code == 1
    assert out.stdout == ""
    assert out.stderr == "error: ValueError: cannot work on 2 items\n"
    debug = invoke("work", "--fail", "--log-level", "debug")
    assert debug.exit_code == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.rstrip().endswith("error: ValueError: cannot work on 2 items")


def test_plain_output_without_json() -> None:
    out = invoke("work", "--n", "5", "--log-level", "ERROR")
    assert out.exit_code == 0
    assert "'n': 5" in out.stdout and "'pool': 'default'" in out.stdout
    assert out.stderr == ""
    plain = invoke("text")
    assert (plain.exit_code, plain.stdout) == (0, "plain text\n")


@pytest.mark.parametrize(
    ("opts", "fragment"),
    [
        ('{"n": 3', "not valid JSON"),
        ("n = = 3", "not valid TOML"),
        ('{"n": 3, "colour": "red"}', "unknown option 'colour'"),
        ('{"n": "three"}', "n = 'three'"),
        ('{"ratio": [1]}', "ratio = [1]"),
        ('{"log_level": "LOUD"}', "log_level = 'LOUD'"),
        ("[1, 2]", "must be a JSON object"),
        ("[server\\nport = 1", "not valid TOML"),
        ('["n"]', "must be a JSON object"),
        ("@/nonexistent/opts.toml", "cannot read --opts file"),
    ],
)
def test_bad_options_give_one_envelope_and_exit_2(opts: str, fragment: str) -> None:
    out = invoke("work", "--json", "--opts", opts)
    assert out.exit_code == 2, out.output
    env = envelope(out)
    assert env["result"] is None and env["log"] == []
    assert env["error"]["type"] == "ConfigError"
    assert fragment in env["error"]["message"]


def test_bad_command_line_with_json_gives_one_envelope() -> None:
    for args in (["--json", "--colour", "red"], ["--json", "--n", "three", "--id", "w1"]):
        out = invoke("work", *args)
        assert out.exit_code == 2
        env = envelope(out)
        assert env["result"] is None and env["error"]["type"]
    assert env["id"] == "w1" and "'--n'" in env["error"]["message"]


def test_bad_options_without_json() -> None:
    out = invoke("work", "--opts", '{"colour": "red"}')
    assert out.exit_code == 2
    assert out.stdout == ""
    assert out.stderr.startswith("error: bad --opts: unknown option 'colour'")
    assert out.stderr.count("\n") == 1


def test_opts_from_toml_file_overridden_by_explicit_option(tmp_path: Path) -> None:
    conf = tmp_path / "work.toml"
    conf.write_text('n = 5\npool = "big"\nratio = 2\nid = "from-file"\nlog-level = "WARNING"\n')
    out = invoke("work", "--json", "--opts", f"@{conf}", "--pool", "small")
    assert out.exit_code == 0, out.output
    env = envelope(out)
    assert env["result"]["n"] == 5  # from the file
    assert env["result"]["pool"] == "small"  # the command line wins
    assert env["result"]["ratio"] == 2.0 and isinstance(env["result"]["ratio"], float)
    assert env["id"] == "from-file"
    assert env["log"] == []  # log-level WARNING came from the file

    explicit_default = envelope(invoke("work", "--json", "--opts", f"@{conf}", "--n", "2"))
    assert explicit_default["result"]["n"] == 2  # explicit even though equal to the default


def test_opts_inline_toml_and_json_file(tmp_path: Path) -> None:
    env = envelope(invoke("work", "--json", "--opts", 'pool = "inline"\nn = 7'))
    assert (env["result"]["n"], env["result"]["pool"]) == (7, "inline")
    conf = tmp_path / "work.conf.json"
    conf.write_text('{"n": 8, "fail": "true"}')
    out = invoke("work", "--json", "--opts", f"@{conf}")
    assert out.exit_code == 1 and envelope(out)["error"]["message"] == "cannot work on 8 items"


def test_load_options_formats(tmp_path: Path) -> None:
    assert load_options("") == {}
    assert load_options('{"a": 1}') == {"a": 1}
    assert load_options("a = 1\n[b]\nc = 'd'") == {"a": 1, "b": {"c": "d"}}
    toml_named_json = tmp_path / "x.toml"
    toml_named_json.write_text('{"a": 1}')
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_options(f"@{toml_named_json}")


def test_hang_keeps_the_command_alive_after_it_returns() -> None:
    started = time.monotonic()
    out = invoke("work", "--json", "--hang", "0.4")
    assert out.exit_code == 0
    assert time.monotonic() - started >= 0.4
    assert envelope(out)["time_s"] < 0.4  # the envelope times the function, not the hang
    assert invoke("work", "--json", "--opts", '{"hang": -1}').exit_code == 2


def test_async_function() -> None:
    out = invoke("async-work", "--json", "--opts", '{"x": 21}')
    assert out.exit_code == 0, out.output
    env = envelope(out)
    assert env["result"] == [21, 42]
    assert [r["message"] for r in env["log"] if r["logger"] == "async-work"] == ["doubling 21"]


def test_sigterm_interrupts_sync_function_cleanly() -> None:
    started = time.monotonic()
    out = invoke("self-terminating", "--json")
    assert time.monotonic() - started < 5
    assert out.exit_code == 0
    env = envelope(out)
    assert env["result"] is None and env["error"] is None
    assert env["log"][-1]["message"] == "stopped by SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_sigterm_cancels_async_function() -> None:
    out = invoke("async-self-terminating", "--json")
    assert out.exit_code == 0
    assert envelope(out)["result"] == "cleaned up after SIGTERM"


def test_flag_mode_only_sets_stopping() -> None:
    out = invoke("draining", "--json")
    assert out.exit_code == 0
    assert envelope(out)["result"] == {"drained": True, "signal": "SIGTERM"}


def test_reserved_and_variadic_parameters_are_rejected() -> None:
    other = typer.Typer()
    with pytest.raises(ConfigError, match="clashes with the shared option --json"):

        @service(other)
        def bad(json: bool = False) -> None: ...

    with pytest.raises(ConfigError, match="cannot be options"):

        @service(other)
        def variadic(*names: str) -> None: ...


def run_example(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=60, **kwargs
    )


def test_example_service_in_a_real_process() -> None:
    done = run_example("--json", "--opts", '{"n": 3}')
    assert done.returncode == 0, done.stderr
    env = json.loads(done.stdout)
    assert env["result"]["squares"] == [0, 1, 4]
    assert env["id"].startswith(socket.gethostname() + ":")
    assert [r["message"] for r in env["log"]] == [
        "square of 0 is 0",
        "square of 1 is 1",
        "square of 2 is 4",
    ]
    failed = run_example("--fail", "--n", "2")
    assert failed.returncode == 1
    assert failed.stderr.splitlines()[-1] == "error: ValueError: asked to fail at i=1"
    assert "Traceback" not in failed.stderr


def test_example_prints_envelope_before_hanging_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--json", "--forever", "--delay", "0.02", "--id", "sq"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None and proc.stdout is not None
        assert "square of 0" in proc.stderr.readline()  # it is running
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0
    env = json.loads(out)
    assert env["id"] == "sq" and env["error"] is None
    assert env["result"]["stopped"] is True and env["result"]["squares"][0] == 0

    hanging = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--json", "--hang", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert hanging.stdout is not None
        env = json.loads(hanging.stdout.readline())  # printed before the hang
        assert env["result"]["squares"] == [0, 1, 4]
        assert hanging.poll() is None  # still alive, hanging
        hanging.send_signal(signal.SIGTERM)  # ends the hang early and cleanly
        assert hanging.wait(timeout=10) == 0
        assert hanging.stdout.read() == ""  # exactly one envelope
    finally:
        hanging.kill()
        hanging.wait()
        hanging.stdout.close()
