"""The grid core on a real Valkey with real worker processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import gridfuncs as gf
import pygirder
from pygirder.calls import GridFunction


@pytest.fixture
def grid(grid_factory):
    return grid_factory(workers=2)


def test_decoded_arguments_bind_back_to_the_signature():
    assert gf.add.bind_payload({"a": 1, "b": 2}) == ((1, 2), {})
    assert gf.add.bind_payload({"b": 2, "a": 1}) == ((1, 2), {})  # any order of names


def test_run_map_submit_and_ids(grid):
    assert grid.run(gf.add(2, 3)) == 5
    assert gf.add(1, b=2).id == gf.add(1, 2).id  # bound to the signature first
    assert gf.add(1).id == gf.add(1, 0).id  # defaults applied
    assert gf.add(1, 2).id != gf.add(2, 1).id
    assert grid.map(gf.add, [(i, i) for i in range(50)]) == [2 * i for i in range(50)]
    fut = grid.submit(gf.add(7, 8))
    assert fut.result(timeout=10) == 15
    done = [f.result() for f in grid.as_completed([gf.add(i, 100) for i in range(10)])]
    assert sorted(done) == [100 + i for i in range(10)]
    assert pygirder.wait(gf.add(1, 1), gf.add(2, 2)) == [2, 4]  # default grid
    assert gf.add(3, 3).result() == 6


def test_request_id_is_stable_across_processes():
    code = "import gridfuncs; print(gridfuncs.add(1, {'b': (2, 3), 'a': {4}}).id)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(gf.__file__),
        env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin"},
    ).stdout.strip()
    assert out == gf.add(1, {"a": {4}, "b": (2, 3)}).id


def test_each_unique_call_executes_exactly_once(grid, tmp_path):
    log = str(tmp_path / "exec.log")
    n = 12
    # paths(i, j) = C(i+j, i); a naive recursion would make millions of calls
    assert grid.run(gf.paths(n, n, log), timeout=60) == 2704156
    counts = gf.count(log)
    assert len(counts) == (n + 1) * (n + 1) - 1  # every node except (0, 0) is reached
    assert set(counts.values()) == {1}, {k: v for k, v in counts.items() if v != 1}


def test_200_identical_slow_calls_run_once(grid, tmp_path):
    log = str(tmp_path / "exec.log")
    # 200 distinct parents spread over the workers all wait on one slow call ...
    parents = grid.map(gf.wait_slow, [(i, 7, 0.5, log) for i in range(200)], timeout=60)
    assert parents == [70 + i for i in range(200)]
    # ... and 200 client threads ask for another one at the same time
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(grid.run(gf.slow(8, 0.5, log))))
        for _ in range(200)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [80] * 200
    counts = gf.count(log)
    assert counts["slow:7"] == 1
    assert counts["slow:8"] == 1
    assert sum(v for k, v in counts.items() if k.startswith("wait_slow")) == 200


def test_reentrancy_deeper_than_workers_and_wider_than_threads(grid):
    assert grid.run(gf.chain(300), timeout=120) == 300
    assert grid.run(gf.wide(1000), timeout=120) == sum(range(1000)) + 1000 * 1000
    assert grid.run(gf.async_chain(40), timeout=60) == 40  # sync and async calling each other
    assert grid.run(gf.async_sum(200), timeout=60) == sum(range(200))


def test_shared_subrequest_already_running_elsewhere_does_not_deadlock(grid, tmp_path):
    log = str(tmp_path / "exec.log")
    # E starts first, for an unrelated caller, and occupies a worker for a while
    e = grid.submit(gf.node_e(log, 1.0))
    deadline = time.monotonic() + 10
    while "E" not in gf.count(log) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert grid.run(gf.node_a(log, 1.0), timeout=30) == "ABDECDE"
    assert e.result(timeout=10) == "E"
    assert gf.count(log) == {"A": 1, "B": 1, "C": 1, "D": 1, "E": 1}


def test_error_propagates_through_three_levels(grid):
    with pytest.raises(pygirder.RemoteError) as info:
        grid.run(gf.fail_level1(5), timeout=30)
    err = info.value
    assert err.remote_type == "gridfuncs.Boom"
    assert err.message == "bad input 5"
    assert "fail_level3" in err.traceback and "raise Boom" in err.traceback
    assert [link.function for link in err.chain] == [
        "gridfuncs:fail_level3",
        "gridfuncs:fail_level2",
        "gridfuncs:fail_level1",
    ]
    assert err.chain[-1].id == gf.fail_level1(5).id
    assert "call chain" in str(err)
    # a grid function may catch a sub-call's failure like any exception
    assert grid.run(gf.catches(6), timeout=30) == "caught gridfuncs.Boom"


def test_unencodable_result_is_a_remote_error(grid):
    with pytest.raises(pygirder.RemoteError) as info:
        grid.run(gf.returns_unencodable(), timeout=30)
    assert "result of gridfuncs:returns_unencodable" in info.value.message


def test_waiting_on_itself_is_an_error(grid):
    with pytest.raises(pygirder.RemoteError, match="waits on itself"):
        grid.run(gf.self_wait(1), timeout=30)


def test_timeout_then_result_is_memoized(grid, tmp_path):
    log = str(tmp_path / "exec.log")
    with pytest.raises(pygirder.GridTimeout) as info:
        grid.run(gf.slow(3, 1.0, log), timeout=0.1)
    assert info.value.call_ids == (gf.slow(3, 1.0, log).id,)
    assert grid.run(gf.slow(3, 1.0, log), timeout=30) == 30
    assert gf.count(log) == {"slow:3": 1}


def test_a_nested_wait_that_times_out_raises_in_the_caller(grid, tmp_path):
    log = str(tmp_path / "exec.log")
    # no worker serves the children's pool: the parent's 0.2 s wait runs out, and the
    # children, which nobody else waits for, are dropped before they start
    reply = grid.run(gf.impatient(7, "served-by-nobody", log), timeout=60)
    assert reply.startswith("timed out on 2: 2 of 2 calls (gridfuncs:gated)"), reply
    assert "not yet started were cancelled" in reply
    assert grid.stats().get("cancelled") == 2, grid.stats()
    assert gf.count(log) == {}


def test_code_version_mismatch_is_refused(grid):
    other = GridFunction(gf.versioned.func, version="2")  # same name, other code version
    try:
        with pytest.raises(pygirder.RemoteError, match="code version mismatch") as info:
            grid.run(other(1), timeout=30)
        assert "v:2" in info.value.message and "v:1" in info.value.message
    finally:
        GridFunction(gf.versioned.func, version="1")  # restore the registry


def test_function_the_workers_cannot_import(grid, tmp_path, monkeypatch):
    (tmp_path / "private_mod.py").write_text(
        "import pygirder\n\n@pygirder.fn\ndef hidden(x):\n    return x\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # the client sees it; the workers do not
    import private_mod

    with pytest.raises(pygirder.RemoteError, match="cannot import module 'private_mod'"):
        grid.run(private_mod.hidden(1), timeout=30)


def test_call_site_errors():
    with pytest.raises(pygirder.GridFunctionError, match="lambda"):
        pygirder.fn(lambda x: x)

    def outer():
        y = 1

        @pygirder.fn
        def inner(x):
            return x + y

    with pytest.raises(pygirder.GridFunctionError, match="closure"):
        outer()
    with pytest.raises(pygirder.GridFunctionError, match="generator"):

        @pygirder.fn
        def gen(x):
            yield x

    with pytest.raises(pygirder.GridFunctionError, match=r"add\(a, b=0\): too many positional"):
        gf.add(1, 2, 3)
    with pytest.raises(pygirder.CodecError) as info:
        _ = gf.add([1, {"k": object()}]).id
    assert "gridfuncs:add arguments['a'][1]['k']" in str(info.value)
    with pytest.raises(pygirder.CodecError, match="lambda"):
        _ = gf.add(lambda: 1).id


def test_misuse_of_the_grid_api(grid):
    with pytest.raises(pygirder.GridFunctionError, match=r"decorate it with @pygirder\.fn"):
        grid.map(len, [(1,)])
    with pytest.raises(pygirder.GridFunctionError, match="not a grid Call"):
        grid.run(gf.add)  # the function, not a call
    with pytest.raises(pygirder.GridFunctionError, match="tuple of positional arguments"):
        grid.map(gf.add, [1, 2])


def test_no_grid_open_gives_a_clear_error():
    with pytest.raises(pygirder.GridFunctionError, match=r"pygirder.connect\(\)"):
        gf.add(1).result()


def test_async_client_api(grid):
    async def main():
        assert await grid.run_async(gf.add(1, 2)) == 3
        assert await gf.add(2, 2) == 4  # await a Call in asyncio client code
        assert await pygirder.gather(gf.add(1), gf.add(2)) == [1, 2]
        assert await grid.map_async(gf.add, [(i,) for i in range(20)]) == list(range(20))
        seen = [f.result() async for f in grid.as_completed_async([gf.add(i, 1) for i in range(5)])]
        assert sorted(seen) == [1, 2, 3, 4, 5]

    asyncio.run(main())


def test_map_streams_with_a_bounded_window(grid):
    produced = 0

    def args():
        nonlocal produced
        for i in range(3000):
            produced += 1
            yield (i, 1)

    assert grid.map(gf.add, args(), window=100) == [i + 1 for i in range(3000)]
    assert produced == 3000


def test_stats_count_executions_and_reuse(grid, tmp_path):
    log = str(tmp_path / "exec.log")
    grid.run(gf.paths(4, 4, log))
    before = grid.stats()
    grid.run(gf.paths(4, 4, log))  # answered from the client's cache: no new work
    assert grid.stats().get("executed") == before.get("executed")
    assert len(gf.count(log)) == 24


SCRIPT = """
import pygirder

@pygirder.fn
def square(x):
    return x * x

@pygirder.fn
def total(n):
    return sum(pygirder.wait(*(square(i) for i in range(n))))

if __name__ == "__main__":
    with pygirder.connect(workers=2) as grid:
        print(grid.run(total(10)), grid.map(square, [(3,), (4,)]))
"""


@pytest.mark.slow
def test_functions_defined_in_the_users_script_work_on_local_workers(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(SCRIPT))
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "285 [9, 16]"


def test_call_graph_records_children_and_outcomes(grid):
    import redis

    from pygirder.store.keys import Keys

    top = gf.wide(3)
    assert grid.run(top) == 3 + 3 + 3 + 3
    keys = Keys(grid.namespace)
    client = redis.Redis.from_url(grid.url, decode_responses=True)
    try:
        record = client.hgetall(keys.call(top.id))
        kids = client.smembers(keys.children(top.id))
    finally:
        client.close()
    assert record["fn"] == "gridfuncs:wide"
    assert record["args"] == "{'n': 3}"
    assert record["state"] == "done" and record["summary"] == "12"
    assert float(record["submitted"]) <= float(record["started"]) <= float(record["finished"])
    assert kids == {gf.add(i, 3).id for i in range(3)}
