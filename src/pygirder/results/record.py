"""The bytes of one stored result: a checked header, then the result envelope as Valkey holds it.

An object is ``MAGIC, header length (4 bytes, big endian), header (JSON), body``.  The
body is the envelope exactly as the worker stored it in Valkey (a signed pickle keeps
its signature, bound to the request id); the header names what the body is the result
of and carries its checksum, so an object that was truncated, corrupted, written by
another codec or stored under the wrong name is recognised and refused
(:class:`CorruptRecord`) instead of being handed to a caller.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass

from ..codec import VERSION as CODEC_VERSION

__all__ = ["CODEC_VERSION", "MAGIC", "CorruptRecord", "Meta", "check_id", "pack", "unpack"]

MAGIC = b"PGRS\x01"
MAX_HEADER = 64 * 1024
_ID = re.compile(r"[0-9a-f]{16,128}")


class CorruptRecord(Exception):
    """A stored object that must not be used: the reason says what is wrong with it."""


@dataclass(frozen=True)
class Meta:
    """What the store knows about one result without reading its body."""

    id: str
    function: str
    fingerprint: str
    size: int  # bytes of the result envelope
    created: float  # epoch seconds it was stored
    accessed: float  # epoch seconds it was last read or stored (the creation on S3)
    codec: int = CODEC_VERSION
    error: bool = False  # the stored outcome is an error (only with cache_errors=True)
    # grid functions the call waited on, with their fingerprints when it ran: a result
    # is stale once one of them has other code (empty where not read, as in listings)
    deps: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id, "function": self.function, "fingerprint": self.fingerprint,
            "size": self.size, "created": self.created, "accessed": self.accessed,
            "codec": self.codec, "error": self.error,
        }  # fmt: skip


def check_id(request_id: str) -> str:
    """A request id is lowercase hex: anything else could name a path outside the store."""
    if not isinstance(request_id, str) or not _ID.fullmatch(request_id):
        raise ValueError(
            f"{request_id!r} is not a request id (lowercase hex, as `pygirder cache ls` or "
            "`call.id` show them)"
        )
    return request_id


def _digest(body: bytes | memoryview) -> str:
    return hashlib.blake2b(body, digest_size=20).hexdigest()


def pack(
    request_id: str,
    body: bytes,
    *,
    function: str,
    fingerprint: str,
    created: float | None = None,
    deps: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """The object to store for ``body``, the result envelope of ``request_id``."""
    header = json.dumps(
        {
            "id": request_id, "fn": function, "fp": fingerprint, "codec": CODEC_VERSION,
            "size": len(body), "blake2b": _digest(body),
            "created": time.time() if created is None else created,
            "deps": [list(d) for d in deps],
        },
        separators=(",", ":"),
    ).encode()  # fmt: skip
    return MAGIC + len(header).to_bytes(4, "big") + header + body


def unpack(data: bytes, expect_id: str) -> tuple[Meta, bytes]:
    """The header and body of a stored object, checked against the id it was read under."""
    if data[: len(MAGIC)] != MAGIC:
        raise CorruptRecord("not a pygirder result object (bad magic)")
    start = len(MAGIC) + 4
    if len(data) < start:
        raise CorruptRecord("truncated before its header")
    length = int.from_bytes(data[len(MAGIC) : start], "big")
    if length > MAX_HEADER or len(data) < start + length:
        raise CorruptRecord("truncated header")
    try:
        header = json.loads(data[start : start + length])
        meta = Meta(
            id=str(header["id"]), function=str(header["fn"]), fingerprint=str(header["fp"]),
            size=int(header["size"]), created=float(header["created"]),
            accessed=float(header["created"]), codec=int(header["codec"]),
            deps=tuple((str(n), str(f)) for n, f in header.get("deps", ())),
        )  # fmt: skip
        checksum = str(header["blake2b"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptRecord(f"unreadable header: {exc}") from None
    body = data[start + length :]
    if meta.id != expect_id:
        raise CorruptRecord(f"holds the result of {meta.id}, not of {expect_id}")
    if meta.codec != CODEC_VERSION:
        raise CorruptRecord(f"written by codec version {meta.codec}, this is {CODEC_VERSION}")
    if len(body) != meta.size:
        raise CorruptRecord(f"truncated: {len(body)} of {meta.size} bytes")
    if _digest(body) != checksum:
        raise CorruptRecord("checksum mismatch")
    return Meta(**{**meta.__dict__, "error": body[:1] == b"E"}), body
