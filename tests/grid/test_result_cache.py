"""Each process's cache of recent results is bounded by bytes as well as by count."""

from __future__ import annotations

import pytest

from pygirder.errors import ConfigError
from pygirder.grid.runtime import Runtime


def _runtime(monkeypatch, budget: int) -> Runtime:
    monkeypatch.setenv("PYGIRDER_CACHE_BYTES", str(budget))
    return Runtime("redis://127.0.0.1:1/0", cache_size=100)  # never connects here


def test_the_oldest_results_go_once_the_bytes_are_spent(monkeypatch):
    rt = _runtime(monkeypatch, 1000)
    for i in range(10):
        rt.resolve(f"r{i}", bytes([i]) * 200)
    assert list(rt._cache) == ["r5", "r6", "r7", "r8", "r9"]
    assert rt._cached_bytes == 1000
    rt.resolve("r7", b"x" * 100)  # a result seen again replaces its old copy
    assert rt._cached_bytes == 900 and list(rt._cache)[-1] == "r7"


def test_a_result_over_a_quarter_of_the_budget_is_not_kept(monkeypatch):
    rt = _runtime(monkeypatch, 1000)
    rt.resolve("small", b"s" * 100)
    rt.resolve("huge", b"h" * 251)
    assert list(rt._cache) == ["small"] and rt._cached_bytes == 100
    rt.forget_cached()
    assert not rt._cache and rt._cached_bytes == 0


def test_the_count_bound_still_holds_and_zero_keeps_nothing(monkeypatch):
    rt = _runtime(monkeypatch, 1 << 20)
    for i in range(150):
        rt.resolve(f"r{i}", b"v")
    assert len(rt._cache) == 100
    off = _runtime(monkeypatch, 0)
    off.resolve("r", b"v")
    assert not off._cache
    monkeypatch.setenv("PYGIRDER_CACHE_BYTES", "lots")
    with pytest.raises(ConfigError, match="PYGIRDER_CACHE_BYTES"):
        Runtime("redis://127.0.0.1:1/0")
