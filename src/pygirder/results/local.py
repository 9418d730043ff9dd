"""A durable result store in a local folder, bounded in size by least-recently-used pruning.

Layout: ``index.sqlite3`` catalogues what is stored, its size and when it was last
used, and holds small results itself (up to ``INLINE_BYTES``: a row costs a few
microseconds, a file a hundred times more); larger ones are files
``objects/<first two hex digits>/<request id>`` (see ``record`` for the bytes):

* a file is written to ``tmp/`` and renamed into place (``os.replace``), a row in a
  transaction, so a reader sees a whole object or none, and two processes storing
  the same result at once simply both succeed (a pure call's result is the same
  bytes whoever computes it);
* there is no fsync: an object cut short by a crash fails its checksum and is
  recomputed, which is cheaper than syncing every result;
* the index (SQLite in WAL mode, shared by every process using the folder) records
  access times for LRU pruning, sizes for the cap and counters for the hit rate.
  A file missing from it is added back when it is read, or by :meth:`reindex`
  (small results live in the index: a deleted index forgets them).

Use a local disk: SQLite's locking is not reliable on network file systems.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .base import Item, ResultStore, StoreStats
from .record import CorruptRecord, Meta, check_id, pack, unpack

log = logging.getLogger("pygirder.results")

__all__ = ["DEFAULT_MAX_BYTES", "LocalStore"]

DEFAULT_MAX_BYTES = 5 * 1024**3
# Results up to this size are kept in the index, larger ones in files of their own.
INLINE_BYTES = 64 * 1024
# Pruning for the cap goes down to this share of it, so it does not run at every put.
PRUNE_TO = 0.9
# A put re-reads the true total from the index after this many bytes since the last
# look (other processes write to the folder too).
RECHECK_BYTES = 16 * 1024**2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    id TEXT PRIMARY KEY, function TEXT NOT NULL, fingerprint TEXT NOT NULL,
    size INTEGER NOT NULL, created REAL NOT NULL, accessed REAL NOT NULL,
    error INTEGER NOT NULL DEFAULT 0, object BLOB
);
CREATE INDEX IF NOT EXISTS objects_accessed ON objects (accessed);
CREATE INDEX IF NOT EXISTS objects_function ON objects (function);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def _setup(db: sqlite3.Connection, attempts: int = 100) -> None:
    """WAL mode and the schema.  Processes opening a new folder at once (the workers of
    a grid) contend for it, and switching to WAL does not wait for a busy database as
    other statements do: try again for a while."""
    for attempt in range(attempts):
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            return
        except sqlite3.OperationalError as exc:
            if ("locked" not in str(exc) and "busy" not in str(exc)) or attempt + 1 == attempts:
                raise
            time.sleep(0.05 + 0.002 * attempt)


class LocalStore(ResultStore):
    """Results in a folder on this machine (``max_bytes``: the size cap, 0 for none)."""

    def __init__(self, root: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES):
        self.root = Path(root)
        self.url = str(self.root)
        self.max_bytes = max_bytes
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        for folder in (self.root, self.objects, self.tmp):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        index = self.root / "index.sqlite3"
        fresh = not index.exists()
        self._lock = threading.Lock()
        self._db = sqlite3.connect(index, timeout=30, check_same_thread=False,
                                   isolation_level=None)  # fmt: skip
        _setup(self._db)
        # reads from the grid's event loop (present) never wait for a write transaction:
        # their own connection, which WAL lets read while another one writes
        self._reader = sqlite3.connect(index, timeout=30, check_same_thread=False,
                                       isolation_level=None)  # fmt: skip
        self._read_lock = threading.Lock()
        self._hits = self._misses = 0  # not yet added to the counters table
        self._counted = 0  # counter rows and access times the last write changed
        self._touched: dict[str, tuple[object, ...]] = {}  # hits whose access time waits
        self._shards: set[str] = set()  # shard folders known to exist
        self._serial = 0  # names this process's temporary files
        self._since_check = RECHECK_BYTES  # look at the true total at the first put
        if fresh:
            self.reindex()

    # -- paths --------------------------------------------------------------------
    def path(self, request_id: str) -> Path:
        check_id(request_id)
        return self.objects / request_id[:2] / request_id

    # -- reading ------------------------------------------------------------------
    def _rows(self, db: sqlite3.Connection, ids: Sequence[str], what: str) -> list[Any]:
        out: list[Any] = []
        for start in range(0, len(ids), 500):
            page = list(ids[start : start + 500])
            out += db.execute(
                f"SELECT {what} FROM objects WHERE id IN ({','.join('?' * len(page))})", page
            ).fetchall()
        return out

    def present(self, ids: Sequence[str]) -> list[str]:
        with self._read_lock:
            known = {row[0] for row in self._rows(self._reader, ids, "id")}
        # the index knows every object but files written before a lost index was
        # rebuilt (reindex() catalogues those): no stat per call that nobody stored
        here = [request_id for request_id in ids if request_id in known]
        with self._lock:
            self._misses += len(ids) - len(here)  # what fetch() would have counted
        return here

    def fetch(self, ids: Sequence[str]) -> dict[str, tuple[Meta, bytes]]:
        found: dict[str, tuple[Meta, bytes]] = {}
        metas: list[Meta] = []
        bad: list[str] = []
        with self._read_lock:
            inline = dict(self._rows(self._reader, ids, "id, object"))
        for request_id in ids:
            data = inline.get(request_id)
            try:
                if data is None:
                    data = self.path(request_id).read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                continue
            except ValueError as exc:  # not an id
                log.warning("result store %s: %s", self.url, exc)
                continue
            try:
                meta, body = unpack(data, request_id)
            except CorruptRecord as exc:
                log.warning("result store %s: object %s is unusable (%s); it is removed and "
                            "the call computed again", self.url, request_id, exc)  # fmt: skip
                bad.append(request_id)
                continue
            found[request_id] = (meta, body)
            metas.append(meta)
        now = time.time()
        with self._lock:
            self._hits += len(found)
            self._misses += len(ids) - len(found)
            if bad:
                self._delete_locked(bad)
            # the access times go with the next write: a read takes no write lock
            for m in metas:
                self._touched[m.id] = (m.id, m.function, m.fingerprint, m.size, m.created,
                                       now, m.error)  # fmt: skip
        return found

    # -- writing ------------------------------------------------------------------
    def put_many(self, items: Sequence[Item]) -> int:
        rows: list[tuple[object, ...]] = []
        inline_bytes = 0
        now = time.time()
        objects, tmp = str(self.objects), str(self.tmp)
        for n, item in enumerate(items):
            if n % 16 == 0:
                # background work: between results let the thread that serves the grid
                # have the interpreter (else a batch holds the GIL for milliseconds and
                # every socket call of the worker's event loop waits behind it)
                time.sleep(0)
            check_id(item.id)
            shard = os.path.join(objects, item.id[:2])
            final = os.path.join(shard, item.id)
            size = len(item.body)
            if size <= INLINE_BYTES:
                data = pack(item.id, item.body, function=item.function,
                            fingerprint=item.fingerprint, created=now, deps=item.deps)  # fmt: skip
                rows.append((item.id, item.function, item.fingerprint, size, now, now,
                             item.body[:1] == b"E", data))  # fmt: skip
                inline_bytes += size
                continue
            rows.append((item.id, item.function, item.fingerprint, size, now, now,
                         item.body[:1] == b"E", None))  # fmt: skip
            if os.path.exists(final):
                continue  # stored already (by us or by anyone: the bytes are the same)
            if shard not in self._shards:
                os.makedirs(shard, mode=0o700, exist_ok=True)
                self._shards.add(shard)
            data = pack(item.id, item.body, function=item.function,
                        fingerprint=item.fingerprint, created=now, deps=item.deps)  # fmt: skip
            self._serial += 1
            part = os.path.join(tmp, f"{item.id}.{os.getpid()}.{self._serial}")
            try:
                with open(part, "wb") as fh:
                    fh.write(data)
                os.replace(part, final)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(part)
                raise
            self._since_check += size
        with self._lock:
            before = self._db.total_changes
            self._write(
                "INSERT OR IGNORE INTO objects (id, function, fingerprint, size, created, "
                "accessed, error, object) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            # new rows: results nobody had stored (the counters' upserts count too)
            written = self._db.total_changes - before - self._counted
            self._since_check += inline_bytes
            if self.max_bytes and self._since_check >= min(RECHECK_BYTES, self.max_bytes // 10):
                self._since_check = 0
                self._enforce_cap_locked()
        return written

    def _write(self, sql: str, rows: Sequence[tuple[object, ...]]) -> None:
        """One transaction: the rows, and the lookups counted since the last write."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if rows:
                db.executemany(sql, rows)
            self._counted = len(self._touched)
            if self._touched:  # files read before their row was written get one too
                db.executemany(
                    "INSERT INTO objects (id, function, fingerprint, size, created, accessed, "
                    "error) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                    "accessed = excluded.accessed",
                    list(self._touched.values()),
                )
            for name, count in (("hits", self._hits), ("misses", self._misses)):
                if count:
                    self._counted += 1
                    db.execute(
                        "INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET "
                        "value = value + excluded.value",
                        (name, count),
                    )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._hits = self._misses = 0
        self._touched.clear()

    def _enforce_cap_locked(self) -> None:
        """Over the cap: drop the least recently used results down to PRUNE_TO of it."""
        total = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM objects").fetchone()[0]
        if total <= self.max_bytes:
            return
        goal = total - int(self.max_bytes * PRUNE_TO)
        victims, freed = [], 0
        for request_id, size in self._db.execute("SELECT id, size FROM objects ORDER BY accessed"):
            if freed >= goal:
                break
            victims.append(request_id)
            freed += size
        self._delete_locked(victims)
        log.info(
            "result store %s reached its cap of %d bytes: pruned %d least recently used "
            "results (%d bytes)", self.url, self.max_bytes, len(victims), freed,
        )  # fmt: skip

    # -- removing -----------------------------------------------------------------
    def delete(self, ids: Iterable[str]) -> int:
        with self._lock:
            return self._delete_locked([check_id(i) for i in ids])

    def _delete_locked(self, ids: list[str]) -> int:
        gone = {row[0] for row in self._rows(self._db, ids, "id")}
        for request_id in ids:
            try:
                self.path(request_id).unlink()
                gone.add(request_id)
            except FileNotFoundError:
                pass
        for start in range(0, len(ids), 500):
            page = ids[start : start + 500]
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(f"DELETE FROM objects WHERE id IN ({','.join('?' * len(page))})", page)
            self._db.execute("COMMIT")
        return len(gone)

    # -- the catalogue ------------------------------------------------------------
    def iterate(self, *, details: bool = True) -> Iterator[Meta]:
        with self._lock:
            if self._touched:
                self._write("", [])
            rows = self._db.execute(
                "SELECT id, function, fingerprint, size, created, accessed, error FROM objects "
                "ORDER BY created"
            ).fetchall()
        for row in rows:
            yield Meta(id=row[0], function=row[1], fingerprint=row[2], size=row[3],
                       created=row[4], accessed=row[5], error=bool(row[6]))  # fmt: skip

    def stats(self) -> StoreStats:
        with self._lock:
            self._write("", [])  # count the lookups made so far
            count, size, oldest, newest = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(created), MAX(created) FROM objects"
            ).fetchone()
            counters = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
        return StoreStats(
            url=self.url, objects=count, bytes=size, oldest=oldest, newest=newest,
            max_bytes=self.max_bytes or None, hits=counters.get("hits", 0),
            misses=counters.get("misses", 0),
        )  # fmt: skip

    def reindex(self) -> int:
        """Catalogue objects the index does not know (a lost or deleted index); returns
        how many were added.  Unreadable objects are removed."""
        added = 0
        for shard in self.objects.iterdir():
            if not shard.is_dir():
                continue
            for path in shard.iterdir():
                try:
                    meta, _ = unpack(path.read_bytes(), path.name)
                except (CorruptRecord, OSError) as exc:
                    log.warning("result store %s: removing unusable %s (%s)", self.url,
                                path.name, exc)  # fmt: skip
                    path.unlink(missing_ok=True)
                    continue
                with self._lock:
                    self._write(
                        "INSERT OR IGNORE INTO objects (id, function, fingerprint, size, "
                        "created, accessed, error) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [(meta.id, meta.function, meta.fingerprint, meta.size, meta.created,
                          meta.created, meta.error)],
                    )  # fmt: skip
                added += 1
        return added

    def close(self) -> None:
        with self._lock:
            if self._hits or self._misses or self._touched:
                self._write("", [])
            self._db.close()
        with self._read_lock:
            self._reader.close()
