"""Write-behind: results reach the store off the caller's thread, and flush loses none."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from pygirder.results import Item
from pygirder.results.local import LocalStore
from pygirder.results.writer import WriteBehind


def item(n: int, size: int = 10) -> Item:
    return Item(f"{n:040x}", b"O" + b"x" * size, "m:f", "fp")


def test_flush_waits_until_everything_offered_is_stored(tmp_path: Path) -> None:
    reported: list[str] = []
    with LocalStore(tmp_path / "s") as store:
        writer = WriteBehind(store, on_stored=reported.extend)
        for start in range(0, 1000, 100):
            writer.offer([item(i) for i in range(start, start + 100)])
        assert writer.flush(30)
        assert writer.pending == 0
        assert len(store.get_many([item(i).id for i in range(1000)])) == 1000
        assert sorted(reported) == sorted(item(i).id for i in range(1000))
        assert writer.close()
        with pytest.raises(RuntimeError, match="closed"):
            writer.offer([item(1)])


def test_a_failing_store_is_logged_and_nothing_is_reported_stored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Full(LocalStore):
        def put_many(self, items: object) -> int:
            raise OSError(28, "No space left on device")

    reported: list[str] = []
    with Full(tmp_path / "s") as store, caplog.at_level(logging.WARNING, "pygirder.results"):
        writer = WriteBehind(store, on_stored=reported.extend)
        writer.offer([item(1), item(2)])
        assert writer.close(10)
    assert reported == [] and writer.failed == 2
    assert "No space left" in caplog.text


def test_wait_room_holds_the_producer_while_too_much_is_pending(tmp_path: Path) -> None:
    gate = threading.Event()

    class Slow(LocalStore):
        def put_many(self, items: object) -> int:
            gate.wait(10)
            return super().put_many(items)  # type: ignore[arg-type]

    with Slow(tmp_path / "s") as store:
        writer = WriteBehind(store, max_pending_bytes=1000)
        writer.offer([item(1, size=5000)])
        assert not writer.wait_room(timeout=0.2)  # the store is stuck: no room
        gate.set()
        assert writer.wait_room(timeout=10)
        assert writer.close(10)
        assert store.get(item(1).id) is not None
