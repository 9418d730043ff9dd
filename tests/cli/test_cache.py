"""`pygirder cache`: stats, ls, prune, rm and get on a real store folder."""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pygirder.cli.main import app
from pygirder.errors import RemoteError
from pygirder.grid.protocol import encode_error, encode_ok
from pygirder.results import Item
from pygirder.results.local import LocalStore


def rid(n: int) -> str:
    return f"{n:040x}"


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, ["cache", *args], catch_exceptions=False)


def envelope(*args: str) -> dict[str, Any]:
    out = cli(*args, "--json")
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def root(tmp_path: Path) -> str:
    with LocalStore(tmp_path / "store") as store:
        store.put_many([Item(rid(i), encode_ok([i, "x"], name="m:f", limit=None), "m:f", "fp1")
                        for i in range(3)])  # fmt: skip
        store.put_many([Item(rid(9), encode_ok({"a": 1}, name="m:g", limit=None), "m:g", "fp2")])
    return str(tmp_path / "store")


def test_stats_counts_objects_bytes_and_hits(root: str) -> None:
    with LocalStore(root) as store:
        store.get_many([rid(0), rid(77)])
    result = envelope("stats", "--store", root)["result"]
    assert result["objects"] == 4
    assert result["bytes"] > 0
    assert (result["hits"], result["misses"], result["hit_rate"]) == (1, 1, 0.5)
    assert result["oldest"] <= time.time()
    out = cli("stats", "--store", root)
    assert out.exit_code == 0 and "50.0% of 2" in out.stdout


def test_ls_filters_by_function(root: str) -> None:
    result = envelope("ls", "--store", root, "--function", "m:g")["result"]
    assert [r["id"] for r in result["results"]] == [rid(9)]
    assert envelope("ls", "--store", root)["result"]["matched"] == 4
    assert "m:f" in cli("ls", "--store", root).stdout


def test_get_prints_the_result_and_rm_removes_it(root: str) -> None:
    out = cli("get", "--store", root, rid(1))
    assert out.exit_code == 0 and json.loads(out.stdout) == [1, "x"]
    assert envelope("rm", "--store", root, rid(1))["result"]["objects"] == 1
    missing = envelope("get", "--store", root, rid(1))
    assert missing["error"]["type"] == "ConfigError"
    assert "cache ls" in missing["error"]["message"]
    bad = cli("get", "--store", root, "../../etc/passwd")
    assert bad.exit_code == 2 and "not a request id" in bad.output


def test_get_of_a_stored_error_exits_1(root: str) -> None:
    with LocalStore(root) as store:
        store.put(rid(5), encode_error(RemoteError("ValueError", "boom", "", [])),
                  function="m:f", fingerprint="fp1")  # fmt: skip
    out = cli("get", "--store", root, rid(5))
    assert out.exit_code == 1 and "boom" in out.output


def test_prune_by_function_and_age(root: str) -> None:
    assert envelope("prune", "--store", root, "--older-than", "1h")["result"]["objects"] == 0
    dry = envelope("prune", "--store", root, "--function", "m:f", "--dry-run")["result"]
    assert (dry["objects"], dry["dry_run"]) == (3, True)
    assert envelope("prune", "--store", root, "--function", "m:f")["result"]["objects"] == 3
    left = envelope("ls", "--store", root)["result"]["results"]
    assert [r["function"] for r in left] == ["m:g"]
    out = cli("prune", "--store", root, "--older-than", "0s")
    assert out.exit_code == 0 and "removed 1 results" in out.stdout


def test_prune_needs_a_condition_and_a_valid_age(root: str) -> None:
    assert "say what to prune" in cli("prune", "--store", root).output
    assert "expected a number" in cli("prune", "--store", root, "--older-than", "soon").output


def test_prune_stale_removes_results_of_changed_or_gone_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = f"cachejobs_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        "import pygirder\n\n@pygirder.fn\ndef f(x):\n    return x + 1\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    current = importlib.import_module(module).f.fingerprint
    root = str(tmp_path / "store")
    with LocalStore(root) as store:
        store.put_many([
            Item(rid(1), b"O\x01", f"{module}:f", current),  # current code: kept
            Item(rid(2), b"O\x02", f"{module}:f", "old-fingerprint"),  # changed: stale
            Item(rid(3), b"O\x03", f"{module}:gone", "fp"),  # function gone: stale
            Item(rid(4), b"O\x04", "elsewhere:f", "fp"),  # module not looked at: kept
        ])  # fmt: skip
    assert "--import" in cli("prune", "--store", root, "--stale").output
    result = envelope("prune", "--store", root, "--stale", "--import", module)["result"]
    assert result["objects"] == 2
    with LocalStore(root) as store:
        assert set(store.get_many([rid(i) for i in range(1, 5)])) == {rid(1), rid(4)}
    sys.modules.pop(module, None)


def test_an_off_store_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYGIRDER_STORE", "off")
    result = envelope("stats")
    assert "store is off" in result["error"]["message"]
