"""A durable result store in S3 (``s3://bucket/prefix``), for fleets and anyone they share with.

Each result is the object ``<prefix>/<request id>`` (see ``record`` for its bytes),
with the function and code fingerprint also as object metadata so listings can show
them without reading bodies.  Writes are conditional (``If-None-Match: *``): the
first writer of a result wins and later ones cost one refused request, never a second
upload of the same bytes over the first.  Reads of a batch run concurrently on a
thread pool (boto3 clients are thread safe), so a worker checking 16 calls pays about
one round trip, not 16.

S3 keeps no access times: size is bounded by the bucket's lifecycle rule (``pygirder
cloud setup`` expires results after ``result_retention_days``) and ``pygirder cache
prune``, not by LRU.  An unreachable or refusing S3 is a miss plus a warning: the
call is computed, never failed, because the store could not be read.
"""

from __future__ import annotations

import logging
import threading
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import ConfigError
from .base import Item, ResultStore, StoreStats
from .record import CorruptRecord, Meta, check_id, pack, unpack

log = logging.getLogger("pygirder.results")

__all__ = ["S3Store", "parse_s3_url"]

CONCURRENCY = 16


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``."""
    parsed = urllib.parse.urlparse(url)
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    if parsed.scheme != "s3" or not bucket:
        raise ConfigError(f"store {url!r}: expected s3://bucket/prefix")
    return bucket, prefix


class S3Store(ResultStore):
    """Results under a prefix of an S3 bucket.  Credentials, region and endpoint come
    from the standard boto3 chain (an instance role on a fleet)."""

    def __init__(self, url: str, *, client: Any = None) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        if client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise ConfigError(
                    f"store {url!r} needs boto3: pip install 'pygirder[cloud]'"
                ) from None
            client = boto3.client(
                "s3",
                config=Config(
                    max_pool_connections=2 * CONCURRENCY,
                    retries={"mode": "standard", "max_attempts": 4},
                    connect_timeout=5, read_timeout=30,
                ),
            )  # fmt: skip
        self.client = client
        self._pool = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="pygirder-s3")
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def key(self, request_id: str) -> str:
        check_id(request_id)
        return f"{self.prefix}/{request_id}" if self.prefix else request_id

    def _warn(self, what: str, exc: BaseException) -> None:
        """A failing S3 is said once per kind of failure, not once per call."""
        kind = _code(exc) or type(exc).__name__
        with self._lock:
            first = kind not in self._warned
            self._warned.add(kind)
        (log.warning if first else log.debug)(
            "result store %s: %s failed (%s); the calls concerned are computed instead",
            self.url, what, exc,
        )  # fmt: skip

    # -- reading ------------------------------------------------------------------
    def _get_one(self, request_id: str) -> tuple[Meta, bytes] | None:
        try:
            key = self.key(request_id)
        except ValueError as exc:
            log.warning("result store %s: %s", self.url, exc)
            return None
        try:
            data = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except Exception as exc:
            if _code(exc) not in ("NoSuchKey", "404", "NotFound"):
                self._warn("reading a result", exc)
            return None
        try:
            return unpack(data, request_id)
        except CorruptRecord as exc:
            log.warning("result store %s: object %s is unusable (%s); it is removed and the "
                        "call computed again", self.url, key, exc)  # fmt: skip
            try:
                self.client.delete_object(Bucket=self.bucket, Key=key)
            except Exception as exc2:
                self._warn("removing an unusable result", exc2)
            return None

    def fetch(self, ids: Sequence[str]) -> dict[str, tuple[Meta, bytes]]:
        if len(ids) == 1:
            found = [self._get_one(ids[0])]
        else:
            found = list(self._pool.map(self._get_one, ids))
        return {i: f for i, f in zip(ids, found, strict=True) if f is not None}

    # -- writing ------------------------------------------------------------------
    def _put_one(self, item: Item) -> bool:
        data = pack(item.id, item.body, function=item.function, fingerprint=item.fingerprint,
                    deps=item.deps)  # fmt: skip
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self.key(item.id), Body=data, IfNoneMatch="*",
                Metadata={"fn": urllib.parse.quote(item.function),
                          "fp": urllib.parse.quote(item.fingerprint)},
            )  # fmt: skip
            return True
        except Exception as exc:
            # 412: stored already; 409: someone is storing it right now.  Same bytes.
            if _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            raise

    def put_many(self, items: Sequence[Item]) -> int:
        if len(items) == 1:
            return int(self._put_one(items[0]))
        return sum(self._pool.map(self._put_one, items))

    # -- removing -----------------------------------------------------------------
    def delete(self, ids: Iterable[str]) -> int:
        keys = [self.key(i) for i in ids]
        gone = 0
        for start in range(0, len(keys), 1000):
            page = keys[start : start + 1000]
            reply = self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in page], "Quiet": True},
            )
            errors = reply.get("Errors") or []
            if errors:
                first = errors[0]
                raise OSError(f"S3 refused to delete {len(errors)} results of {self.url}, "
                              f"e.g. {first.get('Key')}: {first.get('Code')} "
                              f"{first.get('Message')}")  # fmt: skip
            gone += len(page)
        return gone

    # -- the catalogue ------------------------------------------------------------
    def _listing(self) -> Iterator[dict[str, Any]]:
        paginator = self.client.get_paginator("list_objects_v2")
        prefix = f"{self.prefix}/" if self.prefix else ""
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents") or []:
                name = obj["Key"][len(prefix) :]
                if "/" not in name:
                    yield obj

    def _details(self, obj: dict[str, Any]) -> Meta:
        name = obj["Key"].rpartition("/")[2]
        created = obj["LastModified"].timestamp()
        meta = {}
        try:
            meta = self.client.head_object(Bucket=self.bucket, Key=obj["Key"])["Metadata"]
        except Exception as exc:
            self._warn("reading a result's metadata", exc)
        return Meta(
            id=name, function=urllib.parse.unquote(meta.get("fn", "")),
            fingerprint=urllib.parse.unquote(meta.get("fp", "")), size=obj["Size"],
            created=created, accessed=created,
        )  # fmt: skip

    def iterate(self, *, details: bool = True) -> Iterator[Meta]:
        batch: list[dict[str, Any]] = []
        for obj in self._listing():
            if not details:
                created = obj["LastModified"].timestamp()
                yield Meta(id=obj["Key"].rpartition("/")[2], function="", fingerprint="",
                           size=obj["Size"], created=created, accessed=created)  # fmt: skip
                continue
            batch.append(obj)
            if len(batch) >= 256:
                yield from self._pool.map(self._details, batch)
                batch = []
        if batch:
            yield from self._pool.map(self._details, batch)

    def stats(self) -> StoreStats:
        count = size = 0
        oldest = newest = None
        for meta in self.iterate(details=False):
            count += 1
            size += meta.size
            oldest = meta.created if oldest is None else min(oldest, meta.created)
            newest = meta.created if newest is None else max(newest, meta.created)
        return StoreStats(url=self.url, objects=count, bytes=size, oldest=oldest, newest=newest)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""
