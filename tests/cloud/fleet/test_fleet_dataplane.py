"""A fleet on moto plus the local data plane: up, run, exec, failures mid-job, down.

Every instance is a local process tree that boots the real user-data (artifact from
S3, the agent, Valkey or a worker); the fleet commands talk to moto over HTTP and
to the grid on the redis node's loopback address.  What is left after ``down`` is
checked with independent boto3 queries.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from fleet_helpers import amazon_image, data_plane_account, leftovers, nat_state
from typer.testing import CliRunner

import pygirder
from pygirder.cloud.cli import app
from pygirder.cloud.errors import FleetError
from pygirder.cloud.fleet.access import direct_route, grid_url
from pygirder.cloud.fleet.inventory import dashboard_instances
from pygirder.cloud.fleet.launch import UpOptions, up
from pygirder.cloud.sim.rehearse import kill_service
from pygirder.cloud.sim.simulator import Simulator


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_up_run_exec_survive_a_kill_and_a_spot_notice_then_down(
    aws, boto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, aws_, _ = data_plane_account(tmp_path, 'alert_email = "ops@example.com"\n')
    toml, project = tmp_path / "pygirder.toml", tmp_path / "fleetjobs"
    image = amazon_image(boto("ec2"))
    cli = CliRunner()

    def cloud(*args: str) -> str:
        result = cli.invoke(app, [args[0], "--config", str(toml), *args[1:]])
        assert result.exit_code == 0, result.output
        return result.stdout

    simulator = Simulator(
        aws.url, tmp_path / "sim", name="t", poll_interval=0.2, stop_grace=2.0,
        env={"PYGIRDER_HEARTBEAT_TTL": "2"},  # a dead worker's calls come back sooner
    )  # fmt: skip
    with simulator:
        summary = up(
            config,
            UpOptions(
                workers=3, instance_types=("m7a.large", "c7a.large"), image_id=image,
                image_ids=(amazon_image(boto("ec2"), "arm64"),),
                processes="1", deadline_s=90, spot_interval_s=0.5, backoff_s=(0.2, 1.0),
            ),
            aws=aws_,
        )  # fmt: skip
        assert summary.ready("worker") == 3 and summary.ready("redis") == 1
        redis_node = next(m for m in summary.members if m.role == "redis")
        redis_ip = redis_node.private_ip
        assert redis_ip.startswith("127.")  # the loopback address it listens on
        ec2_view = boto("ec2").describe_instances(InstanceIds=[redis_node.instance_id])
        assert ec2_view["Reservations"][0]["Instances"][0]["PrivateIpAddress"] == redis_ip

        assert json.loads(
            cloud("run", "fleetjobs:tree_sum", "--args", "[1]", "--project", str(project))
        ) == 6  # fmt: skip
        status = json.loads(cloud("fleet", "--json"))
        assert sorted(i["role"] for i in status["instances"]) == ["redis"] + ["worker"] * 3
        assert {i["address"] for i in status["instances"] if i["role"] == "redis"} == {redis_ip}
        monkeypatch.chdir(tmp_path)  # the dashboard reads ./pygirder.toml
        seen = {i["id"]: i for i in dashboard_instances() or []}
        assert sorted(i["role"] for i in seen.values()) == ["redis"] + ["worker"] * 3
        assert all(i["state"] == "running" and i["private_ip"] for i in seen.values())
        # Routes to the grid are pluggable; moto gives fleet instances no public
        # address, so there is nothing to tunnel through.
        with (
            pytest.raises(FleetError, match="cannot reach the redis node"),
            grid_url(config, aws=aws_, via="ssh"),
        ):
            pass
        with grid_url(config, aws=aws_, routes=[lambda node, cfg, port: None, direct_route]) as url:
            assert url.endswith(f"@{redis_ip}:6379/0")
        with subprocess.Popen(
            [sys.executable, "-m", "pygirder", "cloud", "tunnel", "--config", str(toml),
             "--via", "direct", "--show-password"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        ) as tunnel:  # fmt: skip
            try:
                line = tunnel.stdout.readline() if tunnel.stdout else ""
            finally:
                tunnel.terminate()
            assert tunnel.wait(20) == 0  # SIGTERM closes the tunnel cleanly
        printed = line.strip().removeprefix("PYGIRDER_REDIS=")
        assert printed.endswith(f"@{redis_ip}:6379/0")
        with redis.Redis.from_url(printed) as client:
            assert client.ping()
        shown = cloud(
            "exec", "worker", "--data-plane", str(tmp_path / "sim"), "--", "echo", "$HOME"
        )
        assert shown.count("exit 0") == 3 and str(tmp_path / "sim" / "instances") in shown

        # A re-entrant job of ~6 s on three workers; one worker process is SIGKILLed
        # and another instance gets a spot interruption notice while it runs.
        import fleetjobs

        depth, leaves = 4, 4**4
        workers = [m.instance_id for m in summary.members if m.role == "worker"]
        with grid_url(config, aws=aws_) as url, pygirder.connect(url) as grid:
            future = grid.submit(fleetjobs.tree_sum(depth, 0, 0.07))
            time.sleep(1.5)
            assert not future.done()
            killed = kill_service(simulator.instance(workers[0]).pid, "worker")
            assert killed
            simulator.interrupt(workers[1], in_seconds=3.0)
            assert future.result(timeout=90) == leaves * (leaves - 1) // 2
        assert simulator.wait_for(workers[1], "terminated", timeout=30)

        report = json.loads(cloud("down", "--json"))
        assert report["clean"] and report["nat"].startswith("stopped")
        again = json.loads(cloud("down", "--json"))  # nothing left to remove: fine
        assert again["clean"] and again["fleets"] == []
    assert not any(leftovers(boto, summary.fleet).values())
    assert nat_state(boto) in ("stopping", "stopped")
