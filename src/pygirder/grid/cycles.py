"""Cycle search over the call graph, a bounded step at a time.

A request that waits on a call from which it is itself reachable (through the
``kids:<id>`` sets of unfinished calls) waits forever.  Finding that out may mean
walking a large graph: a call can have hundreds of thousands of children.  The server
runs one script at a time, so the walk must never be one long script: each step (the
REACH script) looks at a bounded number of set members, and the search's state (which
nodes were seen, which are still to expand, where a half-read set stopped) lives here,
in the waiting worker, from one step to the next.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Sequence
from typing import Any

from ..store import scripts
from ..store.keys import Keys

# Nodes and set members one step looks at (about a microsecond of server time each).
STEP_BUDGET = 2_000
# With a target time per step, the budget adapts between these bounds: a loaded server
# gets smaller steps.
MIN_STEP_BUDGET, MAX_STEP_BUDGET = 100, 20_000
# Nodes sent to one step (each costs one SSCAN at least, and counts against the budget).
STEP_NODES = 2_000
# Unfinished calls one search remembers; a larger pending graph ends the search
# without an answer (it is tried again later, from scratch).
MAX_NODES = 2_000_000


class CycleSearch:
    """Breadth-first search from the calls a request waits on, back to the request.

    ``await search.step(conn, keys)`` advances it by one bounded server call and
    returns the cycle (``[request, child, ..., request]``) once found; ``done`` turns
    true when the search is over without finding one (every unfinished call reachable
    was expanded, or the graph was larger than ``max_nodes``: ``gave_up``).

    With ``target_s``, the budget of the next step follows the time the last one took
    (a round trip, so an upper bound of the script's time): halved when it took over
    twice the target, grown by a quarter when it took under the target.
    """

    def __init__(
        self,
        target: str,
        starts: Sequence[str],
        *,
        step_budget: int = STEP_BUDGET,
        step_nodes: int = STEP_NODES,
        max_nodes: int = MAX_NODES,
        target_s: float | None = None,
    ) -> None:
        self.target = target
        self.step_budget = step_budget
        self.step_nodes = step_nodes
        self.max_nodes = max_nodes
        self.target_s = target_s
        self.parent: dict[str, str | None] = {}
        self.frontier: deque[str] = deque()
        for start in starts:
            if start not in self.parent:
                self.parent[start] = None
                self.frontier.append(start)
        self.cursor = "0"  # where the first frontier node's set was cut short
        self.steps = 0
        self.gave_up = False

    @property
    def done(self) -> bool:
        return self.gave_up or not self.frontier

    async def step(self, conn: scripts.Runner[Awaitable[Any]], keys: Keys) -> list[str] | None:
        """One bounded step; the cycle if it is found now, else None."""
        if self.done:
            return None
        # a node cut short has more children to come: it alone may use up the budget
        count = 1 if self.cursor != "0" else min(self.step_nodes, len(self.frontier))
        nodes = [self.frontier[i] for i in range(count)]
        started = time.perf_counter()
        found, expanded, cursor, pending = await scripts.reach(
            conn, keys, nodes, target=self.target, budget=self.step_budget, cursor=self.cursor
        )
        self.steps += 1
        if self.target_s is not None:
            took = time.perf_counter() - started
            if took > 2 * self.target_s:
                self.step_budget = max(MIN_STEP_BUDGET, self.step_budget // 2)
            elif took < self.target_s:
                self.step_budget = min(MAX_STEP_BUDGET, self.step_budget * 5 // 4)
        if found:
            path = [self.target]
            node: str | None = nodes[int(found) - 1]
            while node is not None:
                path.append(node)
                node = self.parent[node]
            path.append(self.target)
            path.reverse()
            return path
        for _ in range(int(expanded)):
            self.frontier.popleft()
        self.cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        for i in range(0, len(pending), 2):
            kid = pending[i].decode() if isinstance(pending[i], bytes) else str(pending[i])
            if kid not in self.parent:
                self.parent[kid] = nodes[int(pending[i + 1]) - 1]
                self.frontier.append(kid)
        if len(self.parent) > self.max_nodes:
            self.gave_up = True
        return None
