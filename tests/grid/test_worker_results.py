"""Results of one worker go to the server in batches: those that finish while more
taken work is ready share one completion instead of one each."""

from __future__ import annotations

import asyncio
import uuid

from pygirder.grid.protocol import encode_ok
from pygirder.grid.runtime import Runtime
from pygirder.grid.worker import results as results_module
from pygirder.grid.worker.results import GATHER_S, Results


def test_results_finished_while_more_work_is_ready_share_one_completion(redis_url, monkeypatch):
    # a deferred send waits GATHER_S; a long one here, so a loaded machine's slow steps
    # cannot send early what the test expects held
    monkeypatch.setattr(results_module, "GATHER_S", 60.0)

    async def go() -> tuple[int, int, int]:
        runtime = Runtime(redis_url, namespace=f"test-{uuid.uuid4().hex[:10]}",
                          process_id="worker-results")  # fmt: skip
        await runtime.start()
        try:
            results = Results(runtime, worker_id="worker-results", error_ttl=60)
            before = runtime.round_trips
            for i in range(9):  # more taken calls wait behind each of these
                results.add(
                    f"r{i}", "m:f", encode_ok(i, name="m:f", limit=1 << 20), 0, 0.0, "", more=True
                )
                await asyncio.sleep(0)
            held = runtime.round_trips - before
            results.add(
                "r9", "m:f", encode_ok(9, name="m:f", limit=1 << 20), 0, 0.0, "", more=False
            )  # the last one
            await results.drain()
            batched = runtime.round_trips - before
            # with nothing after it, a result goes out at once, and a lone "more" one
            # waits GATHER_S at most
            monkeypatch.setattr(results_module, "GATHER_S", GATHER_S)
            results.add("s0", "m:f", encode_ok(0, name="m:f", limit=1 << 20), 0, 0.0, "", more=True)
            await asyncio.sleep(GATHER_S * 20)
            late = runtime.round_trips - before - batched
            await results.drain()
            return held, batched, late
        finally:
            await runtime.close()

    held, batched, late = asyncio.run(go())
    assert held == 0
    assert batched == 1
    assert late == 1
