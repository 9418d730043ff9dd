"""The fleet controller's rounds against moto in server mode and a real Valkey.

Instances are launched by moto and announced by ``StandInAgents``; spot takes an
instance back by TerminateInstances through the EC2 API; capacity errors are shaped
with botocore's event hooks (``Capacity``), since moto fulfils every request.  Each
test drives :meth:`Controller.step` itself, so no timing decides what it sees.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import redis
from fleet_helpers import TYPES, Capacity, announce, fleet_instances, wait_until, workers_of

import pygirder
from pygirder.cloud.fleet.capacity import PoolBook
from pygirder.cloud.fleet.controller import Controller, status_key
from pygirder.cloud.fleet.converge import Target, write_target
from pygirder.cloud.instance.agent import RunOptions, run_service
from pygirder.cloud.instance.common import Role
from pygirder.cloud.instance.metadata import ImdsClient
from pygirder.cloud.sim.imds import ImdsEmulator
from pygirder.cloud.tags import utcnow

# The service of a worker whose agent runs in a test: it serves until SIGTERM.
SERVICE = [
    sys.executable,
    "-c",
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: exit(0))\nwhile True: time.sleep(0.05)",
]


@pygirder.fn
def waits_for_a_worker(x: int) -> int:
    return x + 1


@pygirder.fn
def fans_out(depth: int, k: int = 0, leaf_s: float = 0.0) -> int:
    """Sum of the leaf numbers below node k: every level waits on four sub-calls."""
    if depth == 0:
        time.sleep(leaf_s)
        return k
    return sum(pygirder.wait(*(fans_out(depth - 1, 4 * k + i, leaf_s) for i in range(4))))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _controller(fleet, redis_url, target: Target, clock=None) -> tuple[Controller, redis.Redis]:
    target.subnets = target.subnets or {"worker": [fleet["res"]["private_subnet_id"]]}
    write_target(fleet["aws"], fleet["config"], fleet["fleet"], target, utcnow())
    grid = redis.Redis.from_url(redis_url)
    control = Controller(
        fleet["config"], fleet["fleet"], aws=fleet["aws"], queue_url=fleet["res"]["queue_url"],
        grid=grid, clock=clock or Clock(),
    )  # fmt: skip
    return control, grid


def _ids(instances) -> set[str]:
    return {i["InstanceId"] for i in instances}


def test_a_terminated_worker_is_replaced(fleet, boto, redis_url) -> None:
    control, grid = _controller(fleet, redis_url, Target(workers=2, instance_types=TYPES))
    first = control.step()
    assert first.live == {"worker": 2} and not first.launched  # at its target already
    before = _ids(workers_of(boto, fleet["fleet"]))
    lost = sorted(before)[0]
    boto("ec2").terminate_instances(InstanceIds=[lost])  # as spot would
    replaced = control.step()
    assert len(replaced.launched["worker"]) == 1
    after = _ids(workers_of(boto, fleet["fleet"]))
    assert lost not in after and len(after) == 2
    # The status the controller publishes says the same.
    status = json.loads(grid.get(status_key(fleet["fleet"])))
    assert status["launched"] == replaced.launched and status["target"] == {"worker": 2}
    assert not control.step().launched  # and nothing more


def test_a_going_away_announcement_starts_the_replacement_early(fleet, boto, redis_url) -> None:
    control, _ = _controller(fleet, redis_url, Target(workers=2, instance_types=TYPES))
    leaving = workers_of(boto, fleet["fleet"])[0]
    announce(fleet["res"]["topic_arn"], leaving, events=("going-away",))
    # The message may take a moment through SNS to SQS: a few rounds at most.
    for _ in range(20):
        result = control.step()
        if result.launched:
            break
    assert result.leaving == [leaving["InstanceId"]] and len(result.launched["worker"]) == 1
    assert len(workers_of(boto, fleet["fleet"])) == 3  # the old one is still there
    boto("ec2").terminate_instances(InstanceIds=[leaving["InstanceId"]])
    settled = control.step()
    assert not settled.launched and settled.live == {"worker": 2} and settled.leaving == []


def _rounds_until(control: Controller, done, rounds: int = 100):
    """Controller rounds until ``done(round)``; messages take a moment through SNS to SQS."""
    for _ in range(rounds):
        result = control.step()
        if done(result):
            return result
        time.sleep(0.1)
    raise AssertionError(f"not reached in {rounds} rounds; last: {result}")


def test_a_rebalance_recommendation_replaces_the_worker_then_drains_it(
    fleet, boto, redis_url
) -> None:
    """The at-risk worker's own agent reads the recommendation from its IMDS and
    announces it; the controller launches a replacement while the old worker serves on,
    and drains it (its agent stops the service and confirms) once the replacement
    announced ``ready``; then it terminates it."""
    control, _ = _controller(fleet, redis_url, Target(workers=2, instance_types=TYPES))
    at_risk = workers_of(boto, fleet["fleet"])[0]["InstanceId"]
    fleet["agents"].silent = {"worker": 1}  # the replacement says nothing until told to
    opts = RunOptions(
        role=Role.WORKER, topic_arn=fleet["res"]["topic_arn"], launch_id="L", fleet=fleet["fleet"],
        redis=redis_url, spot_interval_s=0.1, ready_grace_s=0.2, drain_poll_s=0.1,
    )  # fmt: skip
    outcome: list[int] = []
    with ImdsEmulator(instance_id=at_risk, lifecycle="spot") as imds:
        agent = threading.Thread(
            target=lambda: outcome.append(run_service(
                opts, imds=ImdsClient(imds.url), command=SERVICE, handle_signals=False
            )),
            daemon=True,
        )  # fmt: skip
        agent.start()
        started = time.monotonic()
        imds.recommend_rebalance()
        first = _rounds_until(control, lambda r: r.launched)
        assert first.at_risk == [at_risk] and len(first.launched["worker"]) == 1
        replacement = first.launched["worker"][0]
        assert first.live == {"worker": 1} and not first.draining
        control, _ = _controller(fleet, redis_url, Target(workers=2, instance_types=TYPES))
        for _ in range(3):  # a restarted controller too keeps the old worker serving
            held = control.step()
            assert held.at_risk == [at_risk] and not held.draining and not held.launched
        assert agent.is_alive() and len(workers_of(boto, fleet["fleet"])) == 3
        new = next(i for i in workers_of(boto, fleet["fleet"]) if i["InstanceId"] == replacement)
        announce(fleet["res"]["topic_arn"], new)  # up, then ready
        draining = _rounds_until(control, lambda r: r.draining)
        assert draining.draining == [at_risk] and draining.at_risk == []
        assert not draining.launched
        agent.join(20)  # the drain stopped its service; the agent confirmed and ended
        assert outcome == [0]
        drained = _rounds_until(control, lambda r: r.drained)
        took = time.monotonic() - started
    assert drained.drained == {at_risk: "drained"}
    state = boto("ec2").describe_instances(InstanceIds=[at_risk])
    assert state["Reservations"][0]["Instances"][0]["State"]["Name"] in (
        "shutting-down", "terminated")  # fmt: skip
    live = {i["InstanceId"] for i in workers_of(boto, fleet["fleet"])}
    assert replacement in live and at_risk not in live and len(live) == 2
    settled = control.step()
    assert not settled.launched and not settled.draining and settled.live == {"worker": 2}
    print(f"rebalance recommendation to drained and terminated: {took:.1f}s")


def test_a_replacement_that_never_says_ready_is_terminated_and_replaced(
    fleet, boto, redis_url
) -> None:
    clock = Clock()
    control, _ = _controller(fleet, redis_url, Target(workers=2, instance_types=TYPES), clock)
    fleet["agents"].silent = {"worker": 1}  # the replacement's boot hangs
    boto("ec2").terminate_instances(InstanceIds=[sorted(_ids(workers_of(boto, fleet["fleet"])))[0]])
    hung = control.step().launched["worker"][0]
    wait_until(lambda: hung in fleet["agents"].ignored)
    clock.now += control.boot_timeout_s - 1
    waiting = control.step()
    assert not waiting.launched and waiting.booting == [hung]
    clock.now += 2  # past its boot deadline
    again = control.step()
    assert len(again.launched["worker"]) == 1 and again.launched["worker"] != [hung]
    state = boto("ec2").describe_instances(InstanceIds=[hung])
    assert state["Reservations"][0]["Instances"][0]["State"]["Name"] in (
        "shutting-down", "terminated")  # fmt: skip
    assert hung not in _ids(workers_of(boto, fleet["fleet"]))
    assert len(workers_of(boto, fleet["fleet"])) == 2


def test_a_worker_whose_boot_failed_is_terminated_and_replaced(fleet, boto, redis_url) -> None:
    control, _ = _controller(fleet, redis_url, Target(workers=2, instance_types=TYPES))
    broken = workers_of(boto, fleet["fleet"])[0]
    announce(fleet["res"]["topic_arn"], broken, events=("failed",))
    for _ in range(20):  # through SNS to SQS: a few rounds at most
        result = control.step()
        if result.launched:
            break
    assert len(result.launched["worker"]) == 1
    state = boto("ec2").describe_instances(InstanceIds=[broken["InstanceId"]])
    assert state["Reservations"][0]["Instances"][0]["State"]["Name"] in (
        "shutting-down", "terminated")  # fmt: skip
    assert len(workers_of(boto, fleet["fleet"])) == 2
    assert not control.step().launched


def test_capacity_errors_for_one_pool_shift_launches_to_the_others(fleet, boto, redis_url) -> None:
    capacity = Capacity(fleet["aws"].client("ec2"), empty_types={"c7a.large"})
    control, _ = _controller(fleet, redis_url, Target(workers=4, instance_types=TYPES))
    result = control.step()
    assert len(result.launched["worker"]) == 2
    new = [
        i for i in workers_of(boto, fleet["fleet"]) if i["InstanceId"] in result.launched["worker"]
    ]
    assert len(new) == 2 and all(i["InstanceType"] != "c7a.large" for i in new)
    blocked = {k for k, v in result.pools.items() if v["failures"]}
    assert blocked and all(k.startswith("c7a.large/") for k in blocked)
    # The next launch leaves the failed pool alone: it is backing off.
    boto("ec2").terminate_instances(InstanceIds=result.launched["worker"])
    again = control.step()
    assert len(again.launched["worker"]) == 2
    assert not any(t == "c7a.large" for t, _ in capacity.requests[-1]["pools"])


def test_every_pool_backing_off_stops_launches_until_one_reopens(fleet, boto, redis_url) -> None:
    capacity = Capacity(fleet["aws"].client("ec2"), empty_types=set(TYPES))
    clock = Clock()
    control, _ = _controller(fleet, redis_url, Target(workers=3, instance_types=TYPES), clock)
    first = control.step()
    assert not first.launched and len(capacity.requests) == 1
    second = control.step()  # no CreateFleet at all while every pool backs off
    assert len(capacity.requests) == 1
    assert any("every pool is backing off" in line for line in second.limits)
    capacity.empty_types = set()
    clock.now += 3600  # past the longest back-off of a first failure
    third = control.step()
    assert len(third.launched["worker"]) == 1 and len(capacity.requests) == 2


def test_the_launch_budget_stops_a_runaway_loop(fleet, boto, redis_url) -> None:
    target = Target(workers=2, instance_types=TYPES, max_launches_per_hour=3)
    clock = Clock()
    control, _ = _controller(fleet, redis_url, target, clock)
    launched = 0
    for _ in range(5):  # workers that keep dying: each is replaced, until the budget ends
        if live := list(_ids(workers_of(boto, fleet["fleet"]))):
            boto("ec2").terminate_instances(InstanceIds=live)
        result = control.step()
        launched += len(result.launched.get("worker", []))
    assert launched == 3
    assert any("3 launches in the last hour (at most 3)" in line for line in result.limits)
    clock.now += 3601  # an hour later the budget is back
    assert len(control.step().launched["worker"]) == 2


def test_never_more_than_max_workers_live_while_others_drain(fleet, boto, redis_url) -> None:
    clock = Clock()
    target = Target(workers=2, min_workers=0, max_workers=2, idle_s=60, instance_types=TYPES)
    control, _ = _controller(fleet, redis_url, target, clock)
    control.step()
    clock.now += 61
    assert len(control.step().draining) == 2  # idle: both drain (nobody confirms yet)
    with pygirder.connect(redis_url) as grid:  # work arrives while they drain
        future = grid.submit(waits_for_a_worker(2))
        result = control.step()
        future.cancel()
    assert result.queue["queued"] >= 1 and result.target == {"worker": 1}
    assert not result.launched  # the two draining instances still count
    assert any("2 live (at most 2, 0 going away)" in line for line in result.limits)
    assert len(workers_of(boto, fleet["fleet"])) == 2


def test_scale_to_zero_when_idle_and_back_when_work_waits(
    fleet, boto, redis_url, drain_agents, monkeypatch
) -> None:
    monkeypatch.setenv("PYGIRDER_DRAIN_TIMEOUT_S", "30")
    clock = Clock()
    target = Target(workers=2, min_workers=0, max_workers=3, idle_s=60, instance_types=TYPES)
    control, _ = _controller(fleet, redis_url, target, clock)
    drain_agents(redis_url, fleet["fleet"], list(_ids(workers_of(boto, fleet["fleet"]))))
    assert control.step().target == {"worker": 2}  # idle, but not for long enough
    clock.now += 61
    shrinking = control.step()
    assert shrinking.target == {"worker": 0} and len(shrinking.draining) == 2
    for _ in range(100):
        if not control.step().draining:
            break
    assert workers_of(boto, fleet["fleet"]) == []
    assert [i["InstanceId"] for i in fleet_instances(boto, fleet["fleet"])]  # redis stays

    with pygirder.connect(redis_url) as grid:  # new work: a call waits in the queue
        future = grid.submit(waits_for_a_worker(1))
        back = control.step()
        future.cancel()
    assert back.queue["queued"] >= 1 and back.target == {"worker": 1}
    assert len(back.launched["worker"]) == 1


def test_waking_from_zero_counts_the_calls_waiting_on_a_worker_s_stack(
    fleet, boto, redis_url
) -> None:
    """A job submitted to a fleet at zero is one queued call; once a worker runs it, its
    sub-calls wait on that worker's own stack (shared only with idle workers), not in
    the queue: the controller must see them to grow the fleet to what the job can use."""
    from pygirder.cloud.fleet.controller import grid_demand

    clock = Clock()
    target = Target(workers=0, min_workers=0, max_workers=6, idle_s=600, instance_types=TYPES)
    control, client = _controller(fleet, redis_url, target, clock)
    boto("ec2").terminate_instances(InstanceIds=list(_ids(workers_of(boto, fleet["fleet"]))))
    assert control.step().live == {"worker": 0}  # at zero, nothing asked for
    with pygirder.connect(redis_url) as grid:
        future = grid.submit(fans_out(3, 0, 0.3))  # 64 leaves of 0.3 s
        woken = control.step()
        assert woken.queue["queued"] == 1 and woken.target == {"worker": 1}
        assert len(woken.launched["worker"]) == 1
        # The launched instance's worker starts (a local worker process on the grid).
        with pygirder.connect(redis_url, workers=1, store=None):
            deadline = time.monotonic() + 60
            while grid_demand(client)["stacked"] < 4 and time.monotonic() < deadline:
                time.sleep(0.2)
            grown = control.step()
            future.cancel()
    assert grown.queue["queued"] == 0 and grown.queue["stacked"] >= 4
    assert grown.target == {"worker": 6}  # 1 running + 4 or more stacked, at most max_workers
    assert len(grown.launched["worker"]) == 5
    assert len(workers_of(boto, fleet["fleet"])) == 6


def test_pool_back_off_doubles_per_failure_and_resets_on_success() -> None:
    book = PoolBook(base_s=10.0, cap_s=35.0)
    pool = ("m7a.large", "subnet-1")
    waits = [book.failed(pool, "InsufficientInstanceCapacity", "none", 0.0) for _ in range(4)]
    assert 8.0 <= waits[0] <= 10.0 and 16.0 <= waits[1] <= 20.0 and waits[3] <= 35.0
    assert book.usable([pool], 1.0) == [] and book.usable([pool], 36.0) == [pool]
    assert book.failed(pool, "InvalidInstanceType", "no such type", 0.0) == float("inf")
    book.succeeded(pool)
    assert book.usable([pool], 0.0) == [pool]


def test_distributors_are_not_counted_as_busy_workers(redis_url) -> None:
    from pygirder.cloud.fleet.controller import grid_demand
    from pygirder.store.keys import Keys

    keys = Keys("default")
    with redis.Redis.from_url(redis_url) as client:
        client.hset(keys.workers, "distributor-1", json.dumps({"kind": "distributor"}))
        client.set(keys.heartbeat("distributor-1"), "1", ex=30)
        client.hset(keys.workers, "worker-1", json.dumps({"pool": "workers"}))
        client.set(keys.heartbeat("worker-1"), "1", ex=30)
        client.hset(keys.workers, "worker-dead", json.dumps({"pool": "workers"}))
        client.lpush(keys.queue("default"), "r1", "r2")
        assert grid_demand(client) == {"queued": 2, "stacked": 0, "busy": 1, "alive": 1}
        client.hset(keys.idle("workers"), "worker-1", "0")
        assert grid_demand(client) == {"queued": 2, "stacked": 0, "busy": 0, "alive": 1}
