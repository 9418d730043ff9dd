"""The interface every durable result store implements, and how a store is named.

A store keeps result envelopes under their request id.  It is content addressed (a
request id names a pure call, so whoever stores it stores the same bytes) and
idempotent: a second ``put`` of an id is a no-op, concurrent puts are harmless.  A
backend is one module with one class implementing :class:`ResultStore`; the grid
uses nothing else.
"""

from __future__ import annotations

import logging
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from .record import Meta

log = logging.getLogger("pygirder.results")

__all__ = ["OFF", "PruneReport", "ResultStore", "StoreStats", "default_location", "open_store"]

#: Values of ``store=`` / ``PYGIRDER_STORE`` / ``--store`` that turn the store off.
OFF = frozenset({"off", "none", "no", "0", "false"})


@dataclass(frozen=True)
class Item:
    """One result to store: its request id, envelope and what it is the result of."""

    id: str
    body: bytes
    function: str
    fingerprint: str
    deps: tuple[tuple[str, str], ...] = ()  # (function, fingerprint) it waited on


@dataclass
class StoreStats:
    """What a store holds; ``hits``/``misses`` count lookups (None where not kept)."""

    url: str
    objects: int
    bytes: int
    oldest: float | None  # epoch seconds of the oldest object
    newest: float | None
    max_bytes: int | None = None  # the size cap (None: none, as on S3)
    hits: int | None = None
    misses: int | None = None

    @property
    def hit_rate(self) -> float | None:
        if self.hits is None or self.misses is None or not self.hits + self.misses:
            return None
        return self.hits / (self.hits + self.misses)

    def to_dict(self) -> dict[str, object]:
        return {
            "url": self.url, "objects": self.objects, "bytes": self.bytes,
            "oldest": self.oldest, "newest": self.newest, "max_bytes": self.max_bytes,
            "hits": self.hits, "misses": self.misses, "hit_rate": self.hit_rate,
        }  # fmt: skip


@dataclass
class PruneReport:
    objects: int = 0
    bytes: int = 0
    ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"objects": self.objects, "bytes": self.bytes}


class ResultStore(ABC):
    """A durable, content-addressed home for result envelopes.

    ``get_many`` returns only sound objects: one that is corrupt, truncated or
    stored under another id is logged as a warning, removed, and reported as a miss,
    so the call is simply computed again.  Methods are thread safe and block: the
    grid calls them from threads, off its event loop.
    """

    url: str

    @abstractmethod
    def fetch(self, ids: Sequence[str]) -> dict[str, tuple[Meta, bytes]]:
        """The header and envelope of each id that is stored (misses are left out)."""

    def present(self, ids: Sequence[str]) -> list[str] | None:
        """The ids that may be stored, when a backend can tell at once (a stat, no read);
        None when it cannot.  Lets the grid skip a lookup of calls nobody stored, which
        is most calls of a first run, without leaving its event loop."""
        return None

    def get_many(self, ids: Sequence[str]) -> dict[str, bytes]:
        """The envelopes of the ids that are stored (misses are left out)."""
        return {i: body for i, (_, body) in self.fetch(ids).items()}

    def get(self, request_id: str) -> bytes | None:
        return self.get_many([request_id]).get(request_id)

    @abstractmethod
    def put_many(self, items: Sequence[Item]) -> int:
        """Store results (ids already stored are left alone); returns how many were new."""

    def put(self, request_id: str, body: bytes, *, function: str, fingerprint: str) -> bool:
        return self.put_many([Item(request_id, body, function, fingerprint)]) == 1

    @abstractmethod
    def delete(self, ids: Iterable[str]) -> int:
        """Remove these results (unknown ids are ignored); returns how many went."""

    @abstractmethod
    def iterate(self, *, details: bool = True) -> Iterator[Meta]:
        """The metadata of every stored result.  Without ``details`` a backend may leave
        ``function`` and ``fingerprint`` empty when reading them costs a request each."""

    @abstractmethod
    def stats(self) -> StoreStats: ...

    def prune(
        self,
        select: Callable[[Meta], bool],
        *,
        details: bool = True,
        dry_run: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> PruneReport:
        """Remove every result ``select`` picks; ``progress(done, total)`` as it goes."""
        chosen = [m for m in self.iterate(details=details) if select(m)]
        report = PruneReport()
        total = len(chosen)
        for start in range(0, total, 500):
            page = chosen[start : start + 500]
            if not dry_run:
                self.delete(m.id for m in page)
            report.objects += len(page)
            report.bytes += sum(m.size for m in page)
            report.ids += [m.id for m in page]
            if progress is not None:
                progress(start + len(page), total)
        return report

    def close(self) -> None:  # noqa: B027 (backends without resources need nothing)
        """Release connections and files."""

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"


def default_location() -> Path:
    """The user's cache folder for pygirder results (``$XDG_CACHE_HOME/pygirder/results``,
    ``~/Library/Caches/pygirder/results`` on macOS, ``%LOCALAPPDATA%`` on Windows).

    Not a project folder such as ``./.pygirder/``: a result is named by its function's
    code and arguments, not by where the script runs, so one store serves a script run
    from any folder, checkouts and worktrees included; a folder in the project would
    also end up in commits and backups.  The cache folder is where users and cleaning
    tools expect throw-away data that can be rebuilt.
    """
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    elif os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "pygirder" / "results"


def resolve(spec: str | os.PathLike[str] | None) -> str | None:
    """The store a setting names, as a URL or absolute path; None when it is off.

    ``None`` or ``""`` mean the default (``PYGIRDER_STORE`` if set, else the user
    cache folder); ``"off"`` turns it off; ``s3://bucket/prefix`` is S3; anything
    else a local folder (``~`` expanded, made absolute so worker processes started
    elsewhere find the same one).
    """
    if spec is None or spec == "":
        env = os.environ.get("PYGIRDER_STORE", "")
        spec = env if env else str(default_location())
    text = os.fspath(spec).strip()
    if text.lower() in OFF:
        return None
    if "://" in text:
        scheme = text.partition("://")[0].lower()
        if scheme == "s3":
            return text
        if scheme == "file":
            text = text[len("file://") :]
        else:
            raise ConfigError(
                f"store {text!r}: unknown scheme {scheme!r}; give a folder, "
                "s3://bucket/prefix, or 'off'"
            )
    return str(Path(text).expanduser().absolute())


def open_store(spec: str | os.PathLike[str] | None) -> ResultStore | None:
    """The store ``spec`` names (see :func:`resolve`), opened; None when it is off."""
    url = resolve(spec)
    if url is None:
        return None
    if url.startswith("s3://"):
        from .s3 import S3Store

        return S3Store(url)
    from ..settings import store_max_bytes
    from .local import LocalStore

    return LocalStore(url, max_bytes=store_max_bytes())
