"""Cycle checks: the rationed loop over ``grid.cycles`` for requests that wait long.

A request parked on calls that were already pending elsewhere may be part of a
cycle (``a`` waits on ``b`` waits on ``a``); a real cycle never resolves, so the
parked request is failed with :class:`GridCycleError` once a search finds it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from ...errors import GridCycleError
from ..cycles import STEP_BUDGET, CycleSearch
from ..runtime import Runtime

log = logging.getLogger("pygirder.worker")


@dataclass
class Parked:
    """A request waiting on sub-calls, watched for cycles."""

    children: list[str]
    since: float
    cycle: asyncio.Future[GridCycleError]  # also carries HandedBack on shutdown
    next_check: float
    search: CycleSearch | None = None  # the cycle search under way, between steps


class CycleChecks:
    """Runs bounded cycle searches for the requests parked on one worker."""

    def __init__(self, runtime: Runtime, parked: dict[str, Parked]) -> None:
        self.runtime = runtime
        self.parked = parked  # the worker's own map: requests enter and leave it there
        self.check_after = 2.0  # seconds a request waits before cycle checks
        self.steps = 16  # bounded steps of one cycle search per round
        self.step_budget = STEP_BUDGET  # call-graph nodes and members one step reads
        self.step_target: float | None = 0.005  # seconds per step the budget aims at

    async def run(self) -> None:
        """Look for cycles among requests that have waited a while.

        A search walks the pending part of the call graph on the server, so it is
        rationed: only requests waiting on calls that were already pending elsewhere,
        at most a few per round, longest-waiting first, each round a few bounded steps
        of each search (a large graph takes several rounds, and no step holds the
        server for long).  A search that ends without a cycle is run again after twice
        the time the request has waited.  A real cycle never resolves, so it is found
        in the end.
        """
        while True:
            await asyncio.sleep(self.check_after / 2)
            now = time.monotonic()
            due = sorted(
                (p.since, rid) for rid, p in self.parked.items()
                if p.children and not p.cycle.done()
                and (p.search is not None or now >= p.next_check)
            )  # fmt: skip
            for _, request_id in due[:4]:
                parked = self.parked.get(request_id)
                if parked is None:
                    continue
                try:
                    await self.check(request_id, parked)
                except Exception as exc:
                    parked.search = None
                    parked.next_check = now + 2 * (now - parked.since)
                    log.warning("cycle check of %s failed: %s", request_id, exc)

    async def check(self, request_id: str, parked: Parked) -> None:
        """Advance the request's cycle search by up to ``steps`` bounded steps."""
        assert self.runtime.redis is not None
        keys = self.runtime.keys
        if parked.search is None:
            parked.search = CycleSearch(
                request_id, parked.children, step_budget=self.step_budget,
                target_s=self.step_target,
            )  # fmt: skip
        search = parked.search
        ids: list[str] | None = None
        for _ in range(self.steps):
            ids = await search.step(self.runtime, keys)
            if ids or search.done:
                break
        if ids is None and not search.done:
            return  # out of steps for this round: no answer yet, continued next round
        parked.search = None
        if ids is None:
            if search.gave_up:
                log.warning(
                    "cycle search of %s stopped after %d pending calls; trying again later",
                    request_id, len(search.parent),
                )  # fmt: skip
            now = time.monotonic()
            parked.next_check = now + 2 * (now - parked.since)
            return
        names = []
        for i in ids:
            fn = await self.runtime.redis.hget(keys.call(i), "fn")
            names.append(f"{fn.decode() if fn else '?'}[{i[:12]}]")
        if not parked.cycle.done():
            parked.cycle.set_result(GridCycleError(
                "cycle: " + " -> ".join(names) + " (each waits on the next)",
                cycle=tuple(ids),
            ))  # fmt: skip
