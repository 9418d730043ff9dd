"""A lost redis node, replaced by ``up``: the workers follow, the durable store keeps
what they finished.

moto in server mode plus the local data plane: every instance boots its real
user-data (the artifact from S3, the agent, Valkey or a worker writing results to
the S3 store under ``results/``).  The redis node is terminated through the EC2 API,
``converge`` launches a replacement from the fleet's redis template, and the
workers' agents, reading the fleet's address parameter, restart their service
against it.  A job submitted again is answered from the store, except for the call
that was in flight.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fleet_helpers import amazon_image, data_plane_account, fleet_instances, wait_until

import pygirder
from pygirder.cloud.fleet.access import grid_url
from pygirder.cloud.fleet.converge import Target, converge
from pygirder.cloud.fleet.launch import UpOptions, up
from pygirder.cloud.fleet.teardown import down
from pygirder.cloud.sim.simulator import Simulator
from pygirder.cloud.tags import TAG_ROLE, from_tag_list

TYPES = ("m7a.large", "c7a.large")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_replacement_redis_node_brings_the_workers_back_and_finished_calls_are_restored(
    aws, boto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, aws_, res = data_plane_account(tmp_path)
    project = tmp_path / "fleetjobs"
    monkeypatch.syspath_prepend(str(project))
    import fleetjobs

    ec2, s3 = boto("ec2"), boto("s3")
    simulator = Simulator(
        aws.url, tmp_path / "sim", name="t", poll_interval=0.2, stop_grace=2.0,
        env={
            "PYGIRDER_FOLLOW_INTERVAL_S": "0.5",  # the agents notice the loss in ~1.5 s
            "PYGIRDER_RECONNECT_TIMEOUT": "2",  # a worker without its grid exits soon
            "PYGIRDER_STORE_FLUSH_S": "2",
        },
    )  # fmt: skip
    with simulator:
        summary = up(
            config,
            UpOptions(workers=2, instance_types=TYPES, image_id=amazon_image(ec2, "x86_64"),
                      image_ids=(amazon_image(ec2, "arm64"),), processes="1", deadline_s=120,
                      backoff_s=(0.2, 1.0)),
            aws=aws_,
        )  # fmt: skip
        fleet = summary.fleet
        try:
            old = next(m for m in summary.members if m.role == "redis")
            workers = [m.instance_id for m in summary.members if m.role == "worker"]
            finished = [fleetjobs.tree_sum(0, k) for k in range(8)]
            in_flight = fleetjobs.tree_sum(0, 100, 60.0)  # still running when the node goes
            with grid_url(config, fleet, aws=aws_) as url, pygirder.connect(url) as grid:
                assert grid.map(fleetjobs.tree_sum, [(0, k) for k in range(8)]) == list(range(8))
                grid.submit(in_flight)
                time.sleep(2.0)  # a worker takes it
            keys = {f"results/{call.id}" for call in finished}

            def stored() -> bool:
                got = s3.list_objects_v2(Bucket=res["bucket"], Prefix="results/")
                return keys <= {o["Key"] for o in got.get("Contents", [])}

            wait_until(stored, 30)  # the finished calls are in the S3 store

            ec2.terminate_instances(InstanceIds=[old.instance_id])  # the node is lost
            simulator.wait_for(old.instance_id, "terminated", timeout=30)
            report = converge(config, fleet, Target(workers=2, instance_types=TYPES),
                              aws=aws_, deadline_s=120)  # fmt: skip
            [new] = report.launched["redis"]
            assert new != old.instance_id and not report.problems, report
            node = simulator.instance(new)
            assert node.private_ip != old.private_ip
            # Nothing was launched for the workers: the same two follow the new node.
            live = [i["InstanceId"] for i in fleet_instances(boto, fleet)
                    if from_tag_list(i["Tags"])[TAG_ROLE] == "worker"]  # fmt: skip
            assert sorted(live) == sorted(workers)

            with grid_url(config, fleet, aws=aws_) as url, pygirder.connect(url) as grid:
                assert url.endswith(f"@{node.private_ip}:6379/0")
                wait_until(lambda: len(grid.workers()) >= 2, 90)  # both workers on the new node
                assert grid.stats().get("executed", 0) == 0  # a fresh grid
                results = grid.map(fleetjobs.tree_sum, [(0, k) for k in range(8)])
                assert results == list(range(8))
                stats = grid.stats()
            # The finished calls came back from the store, none of them ran again.
            assert stats.get("restored", 0) == 8 and stats.get("executed", 0) == 0, stats
            for iid in workers:  # each agent says why it restarted its service
                inst = simulator.instance(iid)
                log = inst.console_log.read_text() + (inst.home / "pygirder/boot.log").read_text()
                assert "the grid moved from" in log and node.private_ip in log
        finally:
            down(config, fleet, aws=aws_)
