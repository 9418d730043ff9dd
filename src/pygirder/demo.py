"""`pygirder demo`: the main job, on a private Valkey and local workers.

Two workloads show what the grid is for.  (a) A re-entrant fan-out tree in the spirit
of Girder's test job: every node is an async grid function that waits on its children,
far deeper and wider than there are workers.  (b) A binomial-lattice option price:
each node waits on two children that it shares with its neighbours, so a naive
recursion would make 2^steps calls; the grid runs each of the few unique ones once.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import pygirder

# Lattice parameters (Cox-Ross-Rubinstein): spot, strike, rate, volatility, maturity.
S0, STRIKE, RATE, SIGMA, MATURITY = 100.0, 100.0, 0.05, 0.2, 1.0


def _burn(ms: float) -> None:
    """Busy CPU work standing in for a leaf's real computation."""
    end = time.perf_counter() + ms / 1000.0
    x = 0
    while time.perf_counter() < end:
        x += 1


@pygirder.fn
async def tree(depth: int, fanout: int, leaf_ms: float, k: int) -> int:
    """Number of nodes in the subtree; ``k`` makes every node a distinct call."""
    if depth == 0:
        _burn(leaf_ms)
        return 1
    kids = await pygirder.gather(
        *(tree(depth - 1, fanout, leaf_ms, k * fanout + i) for i in range(fanout))
    )
    return 1 + sum(kids)


def _lattice(steps: int) -> tuple[float, float, float, float]:
    dt = MATURITY / steps
    up = math.exp(SIGMA * math.sqrt(dt))
    down = 1 / up
    p = (math.exp(RATE * dt) - down) / (up - down)
    return up, down, p, math.exp(-RATE * dt)


@pygirder.fn
def price(i: int, j: int, steps: int) -> float:
    """Value of a European call at lattice node (i steps, j up-moves)."""
    up, down, p, disc = _lattice(steps)
    if i == steps:
        return max(S0 * up**j * down ** (i - j) - STRIKE, 0.0)
    hi, lo = pygirder.wait(price(i + 1, j + 1, steps), price(i + 1, j, steps))
    return disc * (p * hi + (1 - p) * lo)


def price_locally(steps: int) -> float:
    """The same price by backward induction in plain Python, to check the grid."""
    up, down, p, disc = _lattice(steps)
    values = [max(S0 * up**j * down ** (steps - j) - STRIKE, 0.0) for j in range(steps + 1)]
    for i in range(steps - 1, -1, -1):
        values = [disc * (p * values[j + 1] + (1 - p) * values[j]) for j in range(i + 1)]
    return values[0]


@dataclass
class Row:
    name: str
    made: int
    executed: int
    wall: float
    check: bool
    detail: str

    @property
    def reused(self) -> int:
        return self.made - self.executed


def measure_demo(
    *, depth: int = 6, fanout: int = 4, leaf_ms: float = 0.2, steps: int = 60,
    workers: int | None = None, quiet: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Run the workloads; returns ``{"ok", "workers", "total_s", "workloads": [...]}``.

    ``quiet`` prints nothing (no start line, no progress bar), for ``--json``.
    """
    from rich.console import Console

    console = Console(quiet=quiet)
    if depth < 2 or fanout < 1 or steps < 1:
        raise pygirder.ConfigError("demo needs --depth >= 2, --fanout >= 1 and --steps >= 1")
    rows: list[Row] = []
    start = time.perf_counter()
    with pygirder.connect(workers=workers) as grid:
        n_workers = len(grid.workers())
        console.print(f"[bold]pygirder demo[/]: private Valkey at {grid.url}, {n_workers} workers "
                      f"(ready in {time.perf_counter() - start:.2f}s)")  # fmt: skip

        # (a) the fan-out tree, mapped over its top two levels to show progress
        before = grid.stats().get("executed", 0)
        t0 = time.perf_counter()
        subtrees = [(depth - 2, fanout, leaf_ms, k) for k in range(fanout**2)]
        sizes: list[Any] = grid.map(tree, subtrees, progress=not quiet)
        wall = time.perf_counter() - t0
        nodes = 1 + fanout + sum(sizes)
        expected = sum(fanout**d for d in range(depth + 1))
        executed = grid.stats().get("executed", 0) - before
        rows.append(Row(f"fan-out tree {fanout}^{depth}", expected - 1 - fanout, executed, wall,
                        nodes == expected, f"{nodes} nodes"))  # fmt: skip

        # (b) the lattice: 2^steps paths, (steps+1)(steps+2)/2 unique calls
        before = grid.stats().get("executed", 0)
        t0 = time.perf_counter()
        value = grid.run(price(0, 0, steps))
        wall = time.perf_counter() - t0
        executed = grid.stats().get("executed", 0) - before
        unique = (steps + 1) * (steps + 2) // 2
        made = 1 + steps * (steps + 1)
        ok = abs(value - price_locally(steps)) < 1e-9 and executed == unique
        rows.append(Row(f"lattice {steps} steps", made, executed, wall, ok,
                        f"price {value:.6f}; {unique} unique calls"))  # fmt: skip

        # (c) the lattice again: every call is now memoized on the grid
        t0 = time.perf_counter()
        again = grid.run(price(0, 0, steps))
        wall = time.perf_counter() - t0
        rows.append(Row("lattice warm", 1, 0, wall, again == value, "answered from the store"))

    workloads = [{**asdict(r), "reused": r.reused} for r in rows]
    return {
        "ok": all(r.check for r in rows),
        "workers": n_workers,
        "total_s": round(time.perf_counter() - start, 3),
        "workloads": workloads,
    }


def print_demo(report: dict[str, Any]) -> None:
    """The table of :func:`measure_demo`'s report, as `pygirder demo` prints it."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="pygirder demo", title_style="bold")
    for col in ("workload", "calls made", "executed", "reused", "wall s", "calls/s", "check"):
        table.add_column(col, justify="left" if col in ("workload", "check") else "right")
    for r in report["workloads"]:
        table.add_row(
            r["name"], f"{r['made']:,}", f"{r['executed']:,}", f"{r['reused']:,}",
            f"{r['wall']:.3f}", f"{r['made'] / r['wall']:,.0f}" if r["wall"] > 0 else "-",
            "[green]ok[/]" if r["check"] else "[red]FAILED[/]",
        )  # fmt: skip
    console.print(table)
    for r in report["workloads"]:
        console.print(f"  {r['name']}: {r['detail']}")
    console.print("  reused = answered from the store or joined a call already running")
    console.print(f"total {report['total_s']:.2f}s")
