"""Large values through one Valkey, in one process: the floor against the paths pygirder
takes and the ones it took before.

    python bench/large_values.py [--values 10] [--repeats 5]

Prints MB/s (median of the repeats) at 1 MB and 10 MB for: a blocking redis-py GET
(B8's floor), redis-py's async MGET (how results were read), ``grid.bulk.get_values``
(how they are read now), redis-py's async SET (how large results were written) and
``grid.bulk.set_value`` (how they are written now).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import redis

from pygirder.grid import bulk
from pygirder.grid.connection import connect_redis
from pygirder.server import EmbeddedServer


async def _paths(url: str, keys: list[str], values: list[bytes], repeats: int) -> dict:
    sync = redis.Redis.from_url(url)
    client = await connect_redis(url, max_connections=1)
    got: dict[str, list[float]] = {
        "floor GET": [], "async MGET": [], "bulk GETs": [], "async SET": [], "bulk SET": [],
    }  # fmt: skip
    total = sum(map(len, values))

    def rate(started: float) -> float:
        return total / (time.perf_counter() - started) / 1e6

    try:
        for _ in range(repeats):
            started = time.perf_counter()
            for key in keys:
                sync.get(key)
            got["floor GET"].append(rate(started))
            started = time.perf_counter()
            await client.mget(keys)
            got["async MGET"].append(rate(started))
            started = time.perf_counter()
            await bulk.get_values(client, keys)
            got["bulk GETs"].append(rate(started))
            started = time.perf_counter()
            for key, value in zip(keys, values, strict=True):
                await client.set(key, value)
            got["async SET"].append(rate(started))
            started = time.perf_counter()
            for key, value in zip(keys, values, strict=True):
                await bulk.set_value(client, key, value, ex=None)
            got["bulk SET"].append(rate(started))
    finally:
        await client.aclose()
        sync.close()
    return {name: statistics.median(rates) for name, rates in got.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with EmbeddedServer() as server:
        for size in (1 << 20, 10 << 20):
            keys = [f"bench:large:{i}" for i in range(args.values)]
            values = [os.urandom(size) for _ in keys]
            redis.Redis.from_url(server.url).mset(dict(zip(keys, values, strict=True)))
            rates = asyncio.run(_paths(server.url, keys, values, args.repeats))
            shown = ", ".join(f"{name} {mb:,.0f}" for name, mb in rates.items())
            print(f"{size >> 20} MB: {shown} MB/s (load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
