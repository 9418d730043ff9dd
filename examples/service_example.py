"""A small service of your own, built with pygirder's service-CLI helper.

It computes the first ``n`` squares, one every ``--delay`` seconds, logging each.
With ``--forever`` it keeps going until it is stopped (SIGTERM or Ctrl-C) and then
returns what it computed so far, which is what a long-running service does.

Try::

    python examples/service_example.py --n 5
    python examples/service_example.py --json --opts '{"n": 3}'
    python examples/service_example.py --json --opts @settings.toml --n 4   # --n wins
    python examples/service_example.py --forever --delay 0.5 --id sq-1      # Ctrl-C stops
    python examples/service_example.py --fail --json                        # error envelope
"""

from __future__ import annotations

import time

import typer

from pygirder.cli.service import ServiceContext, service

app = typer.Typer(add_completion=False)


@service(app, name="squares")
def squares(
    ctx: ServiceContext,
    n: int = 3,
    delay: float = 0.0,
    forever: bool = False,
    fail: bool = False,
) -> dict:
    """Compute squares; with --forever, until stopped."""
    done: list[int] = []
    try:
        i = 0
        while forever or i < n:
            if fail and i == n - 1:
                raise ValueError(f"asked to fail at i={i}")
            done.append(i * i)
            ctx.log.info("square of %d is %d", i, i * i)
            i += 1
            time.sleep(delay)
    except KeyboardInterrupt:  # SIGTERM/SIGINT: return what we have, cleanly
        ctx.log.info("stopping after %d squares", len(done))
    return {"id": ctx.id, "squares": done, "stopped": ctx.stopping.is_set()}


if __name__ == "__main__":
    app()
