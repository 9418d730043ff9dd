"""The durable result store: every completed result under its request id, below Valkey.

Valkey is the grid's coordination layer and hot tier; this store is the memo's long
memory.  A worker that takes a call unknown to Valkey looks it up here first, and every
result it computes is written through here, so results outlive processes, server
restarts and fleets.  ``open_store(spec)`` opens one: a local folder (the default, in
the user's cache folder), ``s3://bucket/prefix``, or nothing for ``"off"``.
"""

from .base import OFF, Item, PruneReport, ResultStore, StoreStats, default_location, open_store
from .base import resolve as resolve_store
from .record import CODEC_VERSION, CorruptRecord, Meta

__all__ = [
    "CODEC_VERSION",
    "OFF",
    "CorruptRecord",
    "Item",
    "Meta",
    "PruneReport",
    "ResultStore",
    "StoreStats",
    "default_location",
    "open_store",
    "resolve_store",
]
