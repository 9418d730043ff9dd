"""What a grid is doing right now, read from its server: workers, pools, counters, calls.

``pygirder status``, ``pygirder inspect`` and the dashboard all show the same figures,
so they are collected here once, as plain JSON-ready dicts, by functions that take a
synchronous ``redis.Redis`` client and a namespace and never write anything:

- :func:`collect_status` -- pools, workers (idle, busy or dead), queue depths, stored
  results, the grid-wide counters and the cache-hit and sharing rates;
- :func:`throughput` -- calls per second between two snapshots;
- :func:`call_info` / :func:`find_calls` -- one call of the call graph, its parent,
  ancestors and children;
- :class:`FailureScanner` -- the most recent failed calls, found by a SCAN that is
  bounded per step, so a large call graph never stalls the caller.

Everything that walks the key space is bounded (``scan_budget``); when a bound cuts a
walk short the figures say so (``complete: false``) rather than pretend.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

import redis

from ..errors import CallLookupError
from ..store.keys import HEARTBEAT_TTL_S, Keys
from ..store.keys import glob_escape as _glob_escape

__all__ = [
    "COUNTERS",
    "MIN_PREFIX",
    "CallLookupError",
    "FailureScanner",
    "call_info",
    "collect_status",
    "count_keys",
    "find_calls",
    "sample_executed",
    "throughput",
]

# The grid-wide counters of the stats hash, in the order they are shown.
COUNTERS = ("submitted", "executed", "cached", "shared", "moved_to_pool", "requeued", "failed")
# Shortest id prefix `inspect` accepts: 8 hex digits are 4 billion possibilities, so a
# prefix this long almost never names two calls of one grid.
MIN_PREFIX = 8
# Keys one SCAN step asks the server to look at (a hint; the server may return more).
_SCAN_COUNT = 1000
# Children listed per call; a call with more shows how many there are in total.
MAX_CHILDREN = 500
# Ancestors listed per call, nearest first; deeper chains are cut (and say so).
MAX_ANCESTORS = 32


# -- small helpers ------------------------------------------------------------------
def _s(value: Any) -> str | None:
    """bytes or str from the server as str (None stays None)."""
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _f(value: Any) -> float | None:
    """A number stored as a string, or None when absent or not a number."""
    try:
        return float(_s(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole > 0 else None


def _decode_hash(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {_s(k) or "": _s(v) or "" for k, v in raw.items()}


def _scan(
    client: redis.Redis, pattern: str, *, budget: int, cursor: int = 0
) -> tuple[list[str], int]:
    """Keys matching ``pattern`` until the walk ends (cursor 0) or ``budget`` keys were
    asked for; returns the keys and the cursor to resume from (0: walk complete)."""
    found: list[str] = []
    asked = 0
    while True:
        cursor, keys = client.scan(cursor=cursor, match=pattern, count=_SCAN_COUNT)
        found.extend(_s(k) or "" for k in keys)
        asked += _SCAN_COUNT
        if cursor == 0 or asked >= budget:
            return found, int(cursor)


# -- the status snapshot --------------------------------------------------------------
def _parse_worker(raw: Any) -> dict[str, Any]:
    """A worker's registration JSON, tolerant of garbage and of fields not yet written."""
    try:
        info = json.loads(raw)
        if not isinstance(info, dict):
            raise ValueError("not an object")
    except (TypeError, ValueError):
        info = {}
    return info


def count_keys(client: redis.Redis, namespace: str, *, budget: int = 100_000) -> dict[str, Any]:
    """One bounded walk over the namespace's keys: how many results, pending requests
    and call records there are, and which pools have a queue or idle workers.

    It is the one expensive part of a status (one SCAN step per thousand keys), so a
    frequent caller can run it less often and pass the result to :func:`collect_status`.
    """
    keys = Keys(namespace)
    counts = {"results": 0, "pending": 0, "calls": 0}
    queues: set[str] = set()
    idles: set[str] = set()
    counted = {keys.result(""): "results", keys.state(""): "pending", keys.call(""): "calls"}
    queue, idle = keys.queue(""), keys.idle("")
    found, cursor = _scan(client, _glob_escape(keys.prefix) + "*", budget=budget)
    for key in found:
        kind = next((k for stem, k in counted.items() if key.startswith(stem)), None)
        if kind is not None:
            counts[kind] += 1
        elif key.startswith(queue):
            queues.add(key[len(queue) :])
        elif key.startswith(idle):
            idles.add(key[len(idle) :])
    return {
        **counts,
        "complete": cursor == 0,
        "pools": sorted(queues | idles),
        "time": time.time(),
    }


def collect_status(
    client: redis.Redis,
    namespace: str,
    *,
    scan_budget: int = 100_000,
    key_counts: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """A snapshot of the grid in ``namespace``, as a JSON-ready dict.

    ``workers``: one entry per registered worker with ``state`` ``idle`` (blocked on
    its pool queue), ``busy`` or ``dead`` (registered but its heartbeat expired), and
    what it reports of its work (``current``, ``calls_done``; None when the worker
    does not publish them).  ``pools``: per pool, how many workers are alive, busy,
    idle and dead and how many entries its queue holds (``totals["stale"]``: how many
    entries of all queues belong to cancelled calls, dropped unrun when a worker
    reaches them).  ``keys``: stored results,
    pending requests and call records, counted by a SCAN of at most ``scan_budget``
    keys (``complete`` says whether it saw them all), or taken from ``key_counts`` (an
    earlier :func:`count_keys`).  ``stats``: the grid-wide
    counters; ``rates``: cache hits and sharing as fractions of all submissions.
    ``calls_per_s`` is left None: it needs two snapshots (see :func:`throughput`).
    """
    keys = Keys(namespace)
    now = time.time() if now is None else now
    walk = key_counts
    if walk is None:
        walk = count_keys(client, namespace, budget=scan_budget)

    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.workers)
    pipe.hgetall(keys.stats)
    raw_workers, raw_stats = pipe.execute()

    infos = {(_s(k) or ""): _parse_worker(v) for k, v in sorted(raw_workers.items())}
    pools = sorted(
        {str(info.get("pool") or "default") for info in infos.values()} | set(walk["pools"])
    )

    pipe = client.pipeline(transaction=False)
    for pool in pools:
        pipe.llen(keys.queue(pool))
        pipe.hkeys(keys.idle(pool))
    for worker_id in infos:
        pipe.pttl(keys.heartbeat(worker_id))
        pipe.lindex(keys.inflight(worker_id), 0)
        pipe.llen(keys.inflight(worker_id))
        pipe.scard(keys.owned(worker_id))
    replies = pipe.execute()
    depth: dict[str, int] = {}
    idle_ids: set[str] = set()
    for i, pool in enumerate(pools):
        depth[pool] = int(replies[2 * i])
        idle_ids.update(_s(w) or "" for w in replies[2 * i + 1])
    replies = replies[2 * len(pools) :]

    workers: list[dict[str, Any]] = []
    for i, (worker_id, info) in enumerate(infos.items()):
        pttl, head, in_flight, owned = replies[4 * i : 4 * i + 4]
        alive = pttl is not None and int(pttl) != -2  # -2: no key; -1: no TTL (still alive)
        if not alive:
            state = "dead"
        elif worker_id in idle_ids:
            state = "idle"
        else:
            state = "busy"
        started = _f(info.get("started"))
        current = info.get("current") if "current" in info else _s(head)
        last_beat = (
            max(0.0, HEARTBEAT_TTL_S - int(pttl) / 1000) if alive and int(pttl) >= 0 else None
        )
        workers.append(
            {
                "id": worker_id,
                "host": info.get("host"),
                "pid": info.get("pid"),
                "pool": str(info.get("pool") or "default"),
                "state": state,
                "current": current if state != "idle" else None,
                "current_fn": info.get("current_fn") if state != "idle" else None,
                "calls_done": info.get("calls_done", info.get("processed")),
                "running": info.get("running"),
                "parked": info.get("parked"),
                "stack": info.get("stack"),
                "in_flight": int(in_flight),
                "owned": int(owned),
                "started": started,
                "uptime_s": max(0.0, now - started) if started is not None else None,
                "last_beat_s": last_beat,
            }
        )
    if any(w["current"] and not w["current_fn"] for w in workers):
        pipe = client.pipeline(transaction=False)
        todo = [w for w in workers if w["current"] and not w["current_fn"]]
        for w in todo:
            pipe.hget(keys.call(w["current"]), "fn")
        for w, fn in zip(todo, pipe.execute(), strict=True):
            w["current_fn"] = _s(fn)

    pool_rows = []
    for pool in pools:
        members = [w for w in workers if w["pool"] == pool]
        pool_rows.append(
            {
                "name": pool,
                "workers": len(members),
                "alive": sum(w["state"] != "dead" for w in members),
                "busy": sum(w["state"] == "busy" for w in members),
                "idle": sum(w["state"] == "idle" for w in members),
                "dead": sum(w["state"] == "dead" for w in members),
                "queued": depth[pool],
            }
        )

    stats = {name: 0 for name in COUNTERS}
    for k, v in raw_stats.items():
        try:
            stats[_s(k) or ""] = int(v)
        except ValueError:
            pass
    lookups = stats["submitted"] + stats["cached"] + stats["shared"]
    totals = {
        field: sum(p[field] for p in pool_rows)
        for field in ("workers", "alive", "busy", "idle", "dead", "queued")
    }
    # A cancelled call's queue entry stays until a worker's take reaches it and drops it
    # unrun: "queued" counts queue entries, "stale" how many of those are such leftovers
    # (a grid-wide count, so per pool only the entries are shown).
    totals["stale"] = min(max(0, stats.get("stale", 0)), totals["queued"])
    return {
        "namespace": namespace,
        "time": now,
        "workers": workers,
        "pools": pool_rows,
        "totals": totals,
        "keys": {k: walk[k] for k in ("results", "pending", "calls", "complete")},
        "stats": stats,
        "rates": {
            "cache_hit": _ratio(stats["cached"], lookups),
            "sharing": _ratio(stats["shared"], lookups),
            "failure": _ratio(stats["failed"], stats["executed"]),
        },
        "calls_per_s": None,
    }


def throughput(before: Mapping[str, Any], after: Mapping[str, Any]) -> float | None:
    """Calls executed per second between two :func:`collect_status` snapshots (None when
    they are not in time order, or the counter went backwards after a reset)."""
    dt = float(after["time"]) - float(before["time"])
    done = int(after["stats"]["executed"]) - int(before["stats"]["executed"])
    if dt <= 0 or done < 0:
        return None
    return done / dt


def sample_executed(client: redis.Redis, namespace: str) -> dict[str, Any]:
    """A minimal snapshot for :func:`throughput`: the time and the executed counter."""
    executed = client.hget(Keys(namespace).stats, "executed")
    return {"time": time.time(), "stats": {"executed": int(executed or 0)}}


# -- recent failures --------------------------------------------------------------------
_CALL_FIELDS = ("fn", "args", "state", "worker", "submitted", "started", "finished", "summary")


def _call_rows(
    client: redis.Redis, keys: Keys, ids: Iterable[str], fields: tuple[str, ...] = _CALL_FIELDS
) -> list[dict[str, Any]]:
    """Selected fields of several call records (None for records that are gone)."""
    ids = list(ids)
    pipe = client.pipeline(transaction=False)
    for request_id in ids:
        pipe.hmget(keys.call(request_id), list(fields))
    rows = []
    for request_id, values in zip(ids, pipe.execute(), strict=True):
        if all(v is None for v in values):
            rows.append({"id": request_id, "missing": True})
            continue
        row: dict[str, Any] = {"id": request_id}
        for name, value in zip(fields, values, strict=True):
            row[name] = _f(value) if name in ("submitted", "started", "finished") else _s(value)
        row["duration_s"] = _duration(row.get("started"), row.get("finished"))
        rows.append(row)
    return rows


def _refine_states(
    client: redis.Redis, keys: Keys, rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Tell apart the unfinished calls that wait in a queue, sit on a worker's stack
    (``local``) or run: the call record only says ``queued`` or ``taken`` until done."""
    open_rows = [r for r in rows if r.get("state") not in ("done", "failed")]
    if open_rows:
        pipe = client.pipeline(transaction=False)
        for row in open_rows:
            pipe.hmget(keys.state(row["id"]), ["s", "o"])
        for row, (s, owner) in zip(open_rows, pipe.execute(), strict=True):
            if s is not None:
                row["state"] = _s(s)
                row["worker"] = _s(owner)
    return rows


def _duration(start: float | None, end: float | None) -> float | None:
    return max(0.0, end - start) if start is not None and end is not None else None


class FailureScanner:
    """Keeps the most recent failed calls, walking ``call:*`` a bounded step at a time.

    The server keeps only the ids of the last 200 failures (``failures``), so they are
    found by SCAN.  Each :meth:`step` looks at about ``step_keys`` keys and resumes
    where the last one stopped; a failure found in the previous full walk stays listed
    until the current walk is complete (so the list does not flicker as the cursor
    wraps around).

    They are ordered by that list, which the server fills in the order the failures
    were stored: calls finishing in one batch share one ``finished`` time, but a
    parent still comes before the child it failed because of.  Failures too old for
    the list follow, by ``finished``.
    """

    def __init__(
        self, client: redis.Redis, namespace: str, *, keep: int = 20, step_keys: int = 5000
    ) -> None:
        self.client = client
        self.keys = Keys(namespace)
        self.keep = keep
        self.step_keys = step_keys
        self._cursor = 0
        self._current: dict[str, dict[str, Any]] = {}
        self._previous: dict[str, dict[str, Any]] = {}
        self._rank: dict[str, int] = {}  # position in the failures list, newest 0
        self.walks = 0  # complete walks over the call graph so far

    def step(self) -> list[dict[str, Any]]:
        """Advance the walk by one bounded step and return the failures known now."""
        stem = self.keys.call("")
        found, self._cursor = _scan(
            self.client, _glob_escape(stem) + "*", budget=self.step_keys, cursor=self._cursor
        )
        ids = [k[len(stem) :] for k in found]
        pipe = self.client.pipeline(transaction=False)
        for request_id in ids:
            pipe.hget(self.keys.call(request_id), "state")
        pipe.lrange(self.keys.failures, 0, -1)
        *states, recent = pipe.execute()
        self._rank = {}
        for rank, request_id in enumerate(_s(r) or "" for r in recent):
            self._rank.setdefault(request_id, rank)
        failed = [i for i, s in zip(ids, states, strict=True) if _s(s) == "failed"]
        for row in _call_rows(self.client, self.keys, failed):
            if not row.get("missing"):
                self._current[row["id"]] = row
        self._current = self._newest(self._current)
        if self._cursor == 0:
            self._previous, self._current = self._current, {}
            self.walks += 1
        return self.failures()

    def scan_all(self, max_steps: int = 20) -> list[dict[str, Any]]:
        """Walk until one full pass is done (or ``max_steps`` steps); the failures."""
        walks = self.walks
        for _ in range(max_steps):
            self.step()
            if self.walks > walks:
                break
        return self.failures()

    def failures(self) -> list[dict[str, Any]]:
        """The failures known now, most recent first."""
        return list(self._newest({**self._previous, **self._current}).values())

    def _newest(self, rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        def order(row: dict[str, Any]) -> tuple[int, float]:
            rank = self._rank.get(row["id"])
            if rank is not None:
                return (0, rank)
            return (1, -(row.get("finished") or 0.0))

        ordered = sorted(rows.values(), key=order)
        return {r["id"]: r for r in ordered[: self.keep]}


# -- one call ------------------------------------------------------------------------
def find_calls(client: redis.Redis, namespace: str, prefix: str, *, limit: int = 10) -> list[str]:
    """Ids of the calls whose id starts with ``prefix`` (call records, results or
    pending requests), at most ``limit`` of them, sorted."""
    keys = Keys(namespace)
    prefix = prefix.strip().lower()
    if len(prefix) >= 40:  # a whole id: no need to walk the key space
        pipe = client.pipeline(transaction=False)
        for key in (keys.call(prefix), keys.result(prefix), keys.state(prefix)):
            pipe.exists(key)
        return [prefix] if any(pipe.execute()) else []
    found: set[str] = set()
    for stem in (keys.call(""), keys.result(""), keys.state("")):
        pattern = _glob_escape(stem + prefix) + "*"
        cursor = 0
        while True:
            cursor, batch = client.scan(cursor=cursor, match=pattern, count=10 * _SCAN_COUNT)
            found.update((_s(k) or "")[len(stem) :] for k in batch)
            if cursor == 0 or len(found) > limit:
                break
        if found:  # call records cover results and pending states that still have one
            break
    return sorted(found)[:limit]


def _decode_result(data: bytes | None) -> dict[str, Any] | None:
    """What a stored result envelope holds, summarized; never raises."""
    if data is None:
        return None
    from ..codec import decode
    from ..grid.protocol import expand, summarize

    try:
        data = expand(data)
    except Exception as exc:
        return {"ok": False, "summary": f"<{len(data)} bytes; not decodable: {exc}>"[:200]}
    kind = data[:1]
    try:
        body = decode(bytes(data[1:]), path="result")
    except Exception as exc:  # a type this process does not know, a newer codec...
        return {
            "ok": kind == b"O",
            "summary": f"<{len(data) - 1} bytes; not decodable here: {exc}>"[:200],
        }
    if kind == b"E" and isinstance(body, dict):
        return {
            "ok": False,
            "summary": f"{body.get('type')}: {body.get('message')}"[:200],
            "error": {
                "type": str(body.get("type", "")),
                "message": str(body.get("message", "")),
                "traceback": str(body.get("traceback", "")),
                "chain": [{"id": str(i), "fn": str(f)} for i, f in body.get("chain", []) or []],
            },
        }
    return {"ok": kind == b"O", "summary": summarize(body), "bytes": len(data) - 1}


def call_info(
    client: redis.Redis,
    namespace: str,
    request_id: str,
    *,
    max_children: int = MAX_CHILDREN,
) -> dict[str, Any]:
    """Everything the grid still knows about one call, as a JSON-ready dict.

    ``request_id`` may be a prefix of at least :data:`MIN_PREFIX` characters.  Fields:
    ``fn``, ``args`` (a bounded repr), ``state`` (``queued``, ``local`` -- on its
    worker's stack or running there --, ``running``, ``done``, ``failed``), ``worker``,
    ``submitted``/``started``/``finished`` (epoch seconds) and ``duration_s``,
    ``result`` (summary, and for failures the remote type, message, traceback and call
    chain), ``parent`` and ``ancestors`` (root first), and ``children`` (each with
    ``fn``, ``state`` and ``duration_s``; ``children_total`` counts them all).  Call
    records expire (CALL_GRAPH_TTL_S); a call whose record is gone but whose result or
    pending state remains is still described, with ``record: false``.

    Raises :class:`CallLookupError` when no call or several calls match.
    """
    keys = Keys(namespace)
    wanted = request_id.strip().lower()
    if len(wanted) < MIN_PREFIX:
        raise CallLookupError(
            f"call id {request_id!r} is too short: give at least {MIN_PREFIX} characters of the id",
            prefix=wanted,
        )
    matches = find_calls(client, namespace, wanted)
    if not matches:
        raise CallLookupError(
            f"no call {request_id!r} in namespace {namespace!r}: it never ran here, or its "
            f"record and result have expired (check --namespace and --redis)",
            prefix=wanted,
        )
    if len(matches) > 1:
        raise CallLookupError(
            f"{request_id!r} matches {len(matches)} calls: "
            + ", ".join(m[:16] for m in matches)
            + "; give more characters of the id",
            prefix=wanted,
            matches=tuple(matches),
        )
    cid = matches[0]

    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.call(cid))
    pipe.hgetall(keys.state(cid))
    pipe.get(keys.result(cid))
    pipe.scard(keys.children(cid))
    pipe.sscan(keys.children(cid), 0, count=max(max_children, 10))
    record_raw, state_raw, result_raw, kids_total, (_, kids_first) = pipe.execute()
    record = _decode_hash(record_raw)
    pending = _decode_hash(state_raw)

    kids = {_s(k) or "" for k in kids_first}
    if int(kids_total) > len(kids):  # SSCAN's first page may be short; read up to the cap
        for k in client.sscan_iter(keys.children(cid), count=1000):
            kids.add(_s(k) or "")
            if len(kids) >= max_children:
                break
    result = _decode_result(result_raw)

    state = record.get("state") or None
    worker = record.get("worker") or None
    if state not in ("done", "failed"):
        if result is not None:
            state = "done" if result["ok"] else "failed"
        elif pending:
            state = {"local": "local", "running": "running", "queued": "queued"}.get(
                pending.get("s", ""), pending.get("s") or "queued"
            )
            worker = pending.get("o") or worker
        elif state is None:
            state = "unknown"
    submitted, started, finished = (_f(record.get(k)) for k in ("submitted", "started", "finished"))
    info: dict[str, Any] = {
        "id": cid,
        "namespace": namespace,
        "record": bool(record),
        "fn": record.get("fn") or None,
        "args": record.get("args") or None,
        "pool": record.get("pool") or pending.get("pool") or None,
        "state": state,
        "worker": worker,
        "attempts": int(pending["n"]) if pending.get("n", "").isdigit() else None,
        "submitted": submitted,
        "started": started,
        "finished": finished,
        "queued_s": _duration(submitted, started),
        "duration_s": _duration(started, finished),
        "summary": record.get("summary") or (result or {}).get("summary"),
        "result": result,
        "parent": None,
        "ancestors": [],
        "ancestors_truncated": False,
        "children": [],
        "children_total": int(kids_total),
    }

    # ancestors, nearest first while walking, shown root first
    parent_id = record.get("parent") or ""
    chain: list[dict[str, Any]] = []
    seen = {cid}
    while parent_id and parent_id not in seen and len(chain) < MAX_ANCESTORS:
        seen.add(parent_id)
        row = _call_rows(client, keys, [parent_id], ("fn", "state", "parent"))[0]
        chain.append({k: row.get(k) for k in ("id", "fn", "state")})
        parent_id = "" if row.get("missing") else (row.get("parent") or "")
    info["ancestors_truncated"] = bool(parent_id) and len(chain) >= MAX_ANCESTORS
    if chain:
        info["parent"] = chain[0]
    info["ancestors"] = list(reversed(chain))

    if kids:
        rows = _call_rows(
            client, keys, sorted(kids), ("fn", "args", "state", "submitted", "started",
                                         "finished", "summary")
        )  # fmt: skip
        rows.sort(key=lambda r: (r.get("submitted") or 0.0, r["id"]))
        info["children"] = _refine_states(client, keys, rows[:max_children])
    return info
