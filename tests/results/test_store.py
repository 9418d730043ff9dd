"""The durable result store on its own: a real folder and S3 on a moto server."""

from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest

from pygirder.results import Item, Meta, open_store
from pygirder.results.local import LocalStore
from pygirder.results.record import MAGIC, pack
from pygirder.results.s3 import S3Store


def rid(n: int) -> str:
    return f"{n:040x}"


def items(n: int, size: int = 100, start: int = 0) -> list[Item]:
    return [
        Item(rid(i), b"O" + bytes([i % 256]) * size, "mod:f", "fp1")
        for i in range(start, start + n)
    ]


@pytest.fixture
def local(tmp_path: Path) -> Any:
    with LocalStore(tmp_path / "store") as store:
        yield store


@pytest.fixture
def s3(aws: Any) -> Any:
    import boto3

    boto3.client("s3").create_bucket(Bucket="results-bucket")
    with S3Store("s3://results-bucket/results") as store:
        yield store


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(request.param)


def test_put_then_get_returns_the_same_bytes(store: Any) -> None:
    batch = items(20)
    assert store.put_many(batch) == 20
    got = store.get_many([i.id for i in batch] + [rid(999)])
    assert got == {i.id: i.body for i in batch}
    assert store.get(rid(999)) is None


def test_a_second_put_of_an_id_is_a_no_op(store: Any) -> None:
    item = items(1)[0]
    assert store.put(item.id, item.body, function=item.function, fingerprint=item.fingerprint)
    assert not store.put(item.id, item.body, function=item.function, fingerprint="other")
    assert store.get(item.id) == item.body


def test_iterate_and_stats_describe_what_is_stored(store: Any) -> None:
    store.put_many(items(3, size=10))
    store.put_many([Item(rid(50), b"E-boom", "mod:g", "fp2")])
    metas = {m.id: m for m in store.iterate()}
    assert set(metas) == {rid(0), rid(1), rid(2), rid(50)}
    assert metas[rid(50)].function == "mod:g"
    assert metas[rid(50)].fingerprint == "fp2"
    stats = store.stats()
    assert stats.objects == 4
    assert stats.bytes >= 3 * 11 + 6
    assert stats.oldest is not None and stats.oldest <= stats.newest


def test_delete_and_prune_remove_what_they_select(store: Any) -> None:
    store.put_many(items(5))
    store.put_many([Item(rid(60), b"Ox", "mod:g", "fp")])
    assert store.delete([rid(0), rid(1)]) == 2
    report = store.prune(lambda m: m.function == "mod:g")
    assert report.objects == 1 and report.ids == [rid(60)]
    assert set(store.get_many([rid(i) for i in (0, 1, 2, 3, 4, 60)])) == {rid(2), rid(3), rid(4)}


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) - 5],  # truncated body
        lambda data: data[:12],  # truncated header
        lambda data: data[:-1] + bytes([data[-1] ^ 1]),  # a flipped bit
        lambda data: b"junk" + data,  # not ours
        lambda data: data.replace(b'"codec":1', b'"codec":9'),  # another codec
    ],
    ids=["truncated", "no-header", "bit-flip", "bad-magic", "other-codec"],
)
def test_a_damaged_object_is_a_miss_with_a_warning_and_is_removed(
    store: Any, damage: Any, caplog: pytest.LogCaptureFixture
) -> None:
    item = items(1)[0]
    store.put_many([item])
    data = pack(item.id, item.body, function=item.function, fingerprint=item.fingerprint)
    _overwrite(store, item.id, damage(data))
    with caplog.at_level(logging.WARNING, logger="pygirder.results"):
        assert store.get_many([item.id]) == {}
    assert "unusable" in caplog.text
    assert store.put_many([item]) == 1  # removed, so the recomputed result is stored
    assert store.get(item.id) == item.body


def test_an_object_stored_under_another_id_is_refused(store: Any) -> None:
    a, b = items(2)
    store.put_many([a])
    _overwrite(store, b.id, pack(a.id, a.body, function="mod:f", fingerprint="fp1"))
    assert store.get_many([b.id]) == {}


def test_ids_that_are_not_hex_are_refused_before_touching_a_path(local: LocalStore) -> None:
    with pytest.raises(ValueError, match="not a request id"):
        local.put("../../etc/passwd", b"Ox", function="f", fingerprint="p")
    assert local.get_many(["../x"]) == {}


def _overwrite(store: Any, request_id: str, data: bytes) -> None:
    if isinstance(store, LocalStore):  # small results live in the index
        store._db.execute(
            "INSERT INTO objects VALUES (?, 'mod:f', 'fp1', ?, 0, 0, 0, ?) "
            "ON CONFLICT(id) DO UPDATE SET object = excluded.object",
            (request_id, len(data), data),
        )
    else:
        store.client.put_object(Bucket=store.bucket, Key=store.key(request_id), Body=data)


# -- local folder ---------------------------------------------------------------------


def test_the_cap_prunes_least_recently_used_results_and_keeps_working(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "s", max_bytes=20_000) as store:
        store.put_many(items(10, size=1000))  # ~10 kB
        for start in range(10, 60, 10):  # five more batches: well past the cap
            assert store.get(rid(0)) is not None  # used between batches: kept
            store.put_many(items(10, size=1000, start=start))
        stats = store.stats()
        assert stats.bytes <= 20_000
        assert store.get(rid(0)) is not None, "the recently used result was pruned"
        assert store.get(rid(1)) is None, "the least recently used result was kept"
        assert store.get(rid(59)) is not None
        rows = store._db.execute("SELECT COUNT(*) FROM objects").fetchone()[0]
        assert rows == stats.objects < 60  # pruned results are gone from the index too


def test_hits_and_misses_are_counted_across_processes(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "s") as a:
        a.put_many(items(2))
        a.get_many([rid(0), rid(1), rid(7)])
    with LocalStore(tmp_path / "s") as b:
        b.get_many([rid(0), rid(8)])
        stats = b.stats()
    assert (stats.hits, stats.misses) == (3, 2)
    assert stats.hit_rate == pytest.approx(0.6)


def test_a_damaged_file_is_a_miss_too(local: LocalStore) -> None:
    big = Item(rid(70), b"O" + b"z" * 100_000, "mod:f", "fp")  # beyond INLINE_BYTES: a file
    local.put_many([big])
    path = local.path(big.id)
    path.write_bytes(path.read_bytes()[:-10])
    assert local.get_many([big.id]) == {}
    assert not path.exists()
    assert local.put_many([big]) == 1 and local.get(big.id) == big.body


def test_a_lost_index_is_rebuilt_from_the_files(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "s") as store:
        store.put_many(items(4, size=100_000))  # files (small results live in the index)
    for name in os.listdir(tmp_path / "s"):
        if name.startswith("index.sqlite3"):
            os.unlink(tmp_path / "s" / name)
    with LocalStore(tmp_path / "s") as store:
        assert store.stats().objects == 4
        assert {m.function for m in store.iterate()} == {"mod:f"}


def _store_many(root: str, start: Any, n: int) -> None:
    start.wait()
    with LocalStore(root) as store:
        for i in range(n):
            store.put_many([Item(rid(i), b"O" + b"same bytes" * 100, "mod:f", "fp")])
            assert store.get(rid(i)) is not None


def test_two_processes_storing_the_same_results_at_once(tmp_path: Path) -> None:
    root = str(tmp_path / "s")
    LocalStore(root).close()
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_store_many, args=(root, start, 200)) for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    with LocalStore(root) as store:
        got = store.get_many([rid(i) for i in range(200)])
        assert len(got) == 200 and set(got.values()) == {b"O" + b"same bytes" * 100}
        assert store.stats().objects == 200
    assert os.listdir(Path(root) / "tmp") == []


def test_open_store_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pygirder.errors import ConfigError
    from pygirder.results import default_location, resolve_store

    monkeypatch.delenv("PYGIRDER_STORE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_store(None) == str(tmp_path / "cache" / "pygirder" / "results")
    assert default_location() == tmp_path / "cache" / "pygirder" / "results"
    assert resolve_store("off") is None and open_store("none") is None
    assert resolve_store("s3://b/p") == "s3://b/p"
    monkeypatch.setenv("PYGIRDER_STORE", "off")
    assert resolve_store(None) is None
    monkeypatch.chdir(tmp_path)
    assert resolve_store("rel") == str(tmp_path / "rel")
    with pytest.raises(ConfigError, match="unknown scheme"):
        resolve_store("gs://bucket")


# -- signed pickle ----------------------------------------------------------------------


def test_a_signed_pickle_keeps_its_signature(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pygirder.errors import CodecError
    from pygirder.grid.protocol import decode_envelope, encode_ok

    monkeypatch.setenv("PYGIRDER_SECRET", "a-shared-secret-of-32-bytes-or-more!")
    request_id = rid(7)
    envelope = encode_ok(Path("/x"), name="mod:f", limit=None, request_id=request_id)
    assert envelope[:1] == b"P"
    with LocalStore(tmp_path / "s") as store:
        store.put(request_id, envelope, function="mod:f", fingerprint="fp")
        body = store.get(request_id)
    assert body == envelope
    assert isinstance(decode_envelope(body, request_id), Path)
    with pytest.raises(CodecError):
        decode_envelope(body, rid(8))  # bound to its own request


# -- S3 ------------------------------------------------------------------------------


def test_s3_objects_carry_their_metadata_and_header(s3: S3Store) -> None:
    import boto3

    s3.put(rid(1), b"Ohello", function="mod:caf\u00e9", fingerprint="fp")
    obj = boto3.client("s3").get_object(Bucket="results-bucket", Key=f"results/{rid(1)}")
    assert obj["Body"].read().startswith(MAGIC)
    [meta] = list(s3.iterate())
    assert isinstance(meta, Meta) and meta.function == "mod:caf\u00e9"


def test_s3_unreachable_is_a_miss_with_a_warning(
    aws: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with S3Store("s3://no-such-bucket/results") as store, caplog.at_level(logging.WARNING):
        assert store.get_many([rid(1), rid(2)]) == {}
    assert "computed instead" in caplog.text


def test_fetch_returns_the_header_with_the_functions_a_result_waited_on(store: Any) -> None:
    deps = (("mod:leaf", "fp-leaf"), ("mod:other", "fp-o"))
    store.put_many([Item(rid(3), b"O\x03", "mod:top", "fp-top", deps)])
    meta, body = store.fetch([rid(3)])[rid(3)]
    assert body == b"O\x03"
    assert (meta.function, meta.fingerprint, meta.deps) == ("mod:top", "fp-top", deps)


def _open_and_store(root: str, start: Any, k: int) -> None:
    start.wait()
    for n in range(20):  # twenty new folders, all processes on the same one at once
        with LocalStore(os.path.join(root, str(n))) as store:
            store.put_many([Item(rid(1000 + k), b"Ok", "mod:f", "fp")])


def test_processes_opening_new_folders_at_once(tmp_path: Path) -> None:
    root = str(tmp_path / "fresh")
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_open_and_store, args=(root, start, k)) for k in range(6)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 6
    for n in range(20):
        with LocalStore(os.path.join(root, str(n))) as store:
            assert store.stats().objects == 6
