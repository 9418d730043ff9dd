"""Quickstart: a memoized, re-entrant recursion and an async fan-out on a private grid.

Run it with `python examples/quickstart.py`: pygirder starts a private Valkey server
and one worker process per core, runs the two jobs and stops everything on exit.
"""

from __future__ import annotations

import math

import pygirder

STEPS = 50  # binomial lattice of a European call option
S0, STRIKE, RATE, SIGMA, T = 100.0, 100.0, 0.05, 0.2, 1.0
DT = T / STEPS
UP = math.exp(SIGMA * math.sqrt(DT))
P = (math.exp(RATE * DT) - 1 / UP) / (UP - 1 / UP)
DISC = math.exp(-RATE * DT)


@pygirder.fn
def price(i: int, j: int) -> float:
    """Option value at node (i, j); each node waits on two children it shares."""
    if i == STEPS:
        return max(S0 * UP ** (2 * j - i) - STRIKE, 0.0)
    up, down = pygirder.wait(price(i + 1, j + 1), price(i + 1, j))
    return DISC * (P * up + (1 - P) * down)


@pygirder.fn
async def tree(depth: int, k: int) -> int:
    """Number of nodes of a 4-ary tree; async grid functions await their children."""
    if depth == 0:
        return 1
    kids = await pygirder.gather(*(tree(depth - 1, 4 * k + i) for i in range(4)))
    return 1 + sum(kids)


if __name__ == "__main__":
    with pygirder.connect() as grid:  # no URL: private Valkey + local workers
        print("option price:", round(grid.run(price(0, 0)), 6))
        print("executed:", grid.stats()["executed"], "of", 2**STEPS, "naive calls")
        print("tree sizes:", grid.map(tree, [(4, k) for k in range(8)], progress=True))
