"""The local data plane: instances launched on moto run their user-data as local process trees.

Every test launches through the EC2 API of the session moto server (RunInstances, or
EC2 Fleet ``instant`` with a launch template, as the fleet does) and watches what the
:class:`~pygirder.cloud.sim.simulator.Simulator` makes of it: the user-data runs through
the boot robot with its own IMDSv2, announces through SNS to SQS, and the process
tree follows the instance's EC2 state.
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from cloud_helpers import fresh_session

from pygirder.cloud.instance.announce import Announcement
from pygirder.cloud.sim.simulator import (
    SimState,
    Simulator,
    SimulatorError,
    request_interrupt,
)
from pygirder.cloud.tags import TAG_MANAGED, TAG_NAME, TAG_ROLE

AMI = "ami-0123456789abcdef0"  # moto does not check image ids unless asked to


def managed_tags(role: str = "worker") -> list[dict[str, Any]]:
    tags = [
        {"Key": TAG_MANAGED, "Value": "true"},
        {"Key": TAG_NAME, "Value": "t"},
        {"Key": TAG_ROLE, "Value": role},
    ]
    return [{"ResourceType": "instance", "Tags": tags}]


@pytest.fixture
def ec2(aws: Any) -> Any:
    return fresh_session("us-east-1").client("ec2")


@pytest.fixture
def topic(aws: Any) -> tuple[str, Callable[..., list[Announcement]]]:
    """A status topic with a raw-delivery queue, and ``receive(n)`` for its messages."""
    session = fresh_session("us-east-1")
    sns, sqs = session.client("sns"), session.client("sqs")
    topic_arn = sns.create_topic(Name="pygirder-t-status")["TopicArn"]
    queue_url = sqs.create_queue(QueueName="pygirder-t-status")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    sns.subscribe(
        TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn,
        Attributes={"RawMessageDelivery": "true"},
    )  # fmt: skip

    def receive(count: int, timeout: int = 20) -> list[Announcement]:
        found: list[Announcement] = []
        for _ in range(timeout):
            got = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
            for message in got.get("Messages", []):
                found.append(Announcement.from_message(message["Body"]))
                sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
            if len(found) >= count:
                return found
        raise AssertionError(f"expected {count} announcements, got {found}")

    return topic_arn, receive


@pytest.fixture
def sim(aws: Any, tmp_path: Path) -> Iterator[Simulator]:
    with Simulator(aws.url, tmp_path / "sim", poll_interval=0.2, stop_grace=2.0) as simulator:
        yield simulator


def run_instance(ec2: Any, user_data: str, *, spot: bool = False, **extra: Any) -> str:
    params: dict[str, Any] = dict(
        ImageId=AMI, MinCount=1, MaxCount=1, InstanceType="t3.micro", UserData=user_data,
        TagSpecifications=managed_tags(),
        MetadataOptions={"HttpTokens": "required", "InstanceMetadataTags": "enabled"},
    )  # fmt: skip
    if spot:
        params["InstanceMarketOptions"] = {"MarketType": "spot"}
    params.update(extra)
    return ec2.run_instances(**params)["Instances"][0]["InstanceId"]


def imds_get(url: str, path: str) -> tuple[int, str]:
    token_req = urllib.request.Request(
        url + "/latest/api/token", method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
    )  # fmt: skip
    with urllib.request.urlopen(token_req, timeout=5) as resp:
        token = resp.read().decode()
    req = urllib.request.Request(url + path, headers={"X-aws-ec2-metadata-token": token})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code, ""


def ec2_state(ec2: Any, instance_id: str) -> str:
    reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return reservations[0]["Instances"][0]["State"]["Name"]


def eventually(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout}s"
        time.sleep(0.05)


def tree(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


# A user-data script in the shape of the real one: announce through the agent, prove the
# private address is bindable, leave a daemon in its own session, then keep running.
ANNOUNCING = """#!/bin/bash
set -Eeuo pipefail
"$PYGIRDER_PYTHON" -m pygirder.cloud.instance.agent announce --topic-arn {topic} \\
    --launch-id L-sim --role worker --event up --fleet f-sim
"$PYGIRDER_PYTHON" - <<'EOF'
import os, socket, urllib.request
base = os.environ["PYGIRDER_IMDS_ENDPOINT"]
token = urllib.request.urlopen(urllib.request.Request(
    base + "/latest/api/token", method="PUT",
    headers={{"X-aws-ec2-metadata-token-ttl-seconds": "60"}})).read().decode()
ip = urllib.request.urlopen(urllib.request.Request(
    base + "/latest/meta-data/local-ipv4", headers={{"X-aws-ec2-metadata-token": token}})).read()
with socket.socket() as sock:
    sock.bind((ip.decode(), 0))
    sock.listen()
    open(os.path.expanduser("~/bound"), "w").write("%s:%d" % sock.getsockname())
EOF
env | sort > "$HOME/env"
touch "$HOME/ready"
setsid sleep 300 &
exec sleep 301
"""


def test_an_instance_runs_its_user_data_with_its_own_imds_and_address(
    ec2, topic, sim: Simulator
) -> None:
    topic_arn, receive = topic
    iid = run_instance(ec2, ANNOUNCING.format(topic=topic_arn), spot=True)
    booted = sim.wait_for(iid, SimState.RUNNING, timeout=20)
    assert booted.lifecycle == "spot" and booted.boots == 1
    assert booted.private_ip.startswith("127.") and booted.private_ip != "127.0.0.1"

    [up] = receive(1)
    assert (up.event, up.instance_id, up.private_ip) == ("up", iid, booted.private_ip)
    assert (up.lifecycle, up.zone, up.instance_type) == ("spot", "us-east-1a", "t3.micro")
    assert up.launch_id == "L-sim" and up.fleet == "f-sim"

    url = booted.imds_url
    assert url is not None
    assert imds_get(url, "/latest/meta-data/instance-id") == (200, iid)
    assert imds_get(url, "/latest/meta-data/local-ipv4") == (200, booted.private_ip)
    assert imds_get(url, "/latest/meta-data/tags/instance/pygirder:role") == (200, "worker")
    assert imds_get(url, "/latest/user-data")[1].startswith("#!/bin/bash")
    assert imds_get(url, "/latest/meta-data/spot/instance-action")[0] == 404

    home = booted.home
    eventually((home / "ready").exists)
    assert (home / "bound").read_text().startswith(booted.private_ip + ":")
    env = dict(
        line.split("=", 1) for line in (home / "env").read_text().splitlines() if "=" in line
    )
    assert env["PYGIRDER_SIMULATED"] == "1"
    assert env["AWS_ENDPOINT_URL"] == sim.endpoint
    assert env["HOME"] == str(home)
    assert f"shutdown {iid}" in env["PYGIRDER_SHUTDOWN_COMMAND"]
    assert "AWS_PROFILE" not in env
    assert "pygirder-boot: running the user-data" in booted.console_log.read_text()

    stamp = sim.interrupt(iid, action="terminate", in_seconds=90, reclaim=False)
    status, body = imds_get(url, "/latest/meta-data/spot/instance-action")
    assert status == 200 and json.loads(body) == {"action": "terminate", "time": stamp}

    def sleeps() -> int:  # the user-data starts them after it touched "ready"
        return len([p for p in tree(sim.instance(iid).pid or 0) if p.name() == "sleep"])

    eventually(lambda: sleeps() == 2)  # one in its own session
    processes = tree(sim.instance(iid).pid or 0)
    assert sim.instance(iid).peak_rss_bytes

    ec2.terminate_instances(InstanceIds=[iid])
    gone = sim.wait_for(iid, SimState.TERMINATED, timeout=15)
    assert gone.pid is None and gone.ec2_state == "terminated"
    _, alive = psutil.wait_procs(processes, timeout=5)
    assert alive == [], f"processes of {iid} survived its termination: {alive}"


def test_self_termination_through_the_shutdown_command(ec2, sim: Simulator) -> None:
    # What the agent does when the time-to-live runs out, with the simulator's command.
    script = (
        "#!/bin/bash\nset -eu\n"
        '"$PYGIRDER_PYTHON" -m pygirder.cloud.instance.agent wait-expiry --ttl 0.5 '
        '--shutdown-command "$PYGIRDER_SHUTDOWN_COMMAND"\n'
        "sleep 60\n"
    )
    iid = run_instance(ec2, script, InstanceInitiatedShutdownBehavior="terminate")
    sim.wait_for(iid, SimState.RUNNING, timeout=20)
    done = sim.wait_for(iid, SimState.TERMINATED, timeout=30)
    assert ec2_state(ec2, iid) == "terminated"
    assert f"shutdown: {iid} (terminate on shutdown)" in done.console_log.read_text()


def test_shutdown_honours_stop_behaviour_and_a_started_instance_boots_again(
    ec2, sim: Simulator
) -> None:
    script = '#!/bin/bash\necho boot >> "$HOME/boots"\nexec sleep 300\n'
    iid = run_instance(ec2, script)  # shutdown behaviour: stop (EC2's default)
    first = sim.wait_for(iid, SimState.RUNNING, timeout=20)
    assert first.lifecycle == "on-demand"
    boots = first.home / "boots"
    eventually(boots.exists, timeout=20)  # a stop during boot would be fine, but not tested
    with pytest.raises(SimulatorError, match="on-demand"):
        sim.interrupt(iid)

    ec2.stop_instances(InstanceIds=[iid])
    stopped = sim.wait_for(iid, SimState.STOPPED, timeout=15)
    assert stopped.pid is None
    ec2.start_instances(InstanceIds=[iid])
    again = sim.wait_for(iid, SimState.RUNNING, timeout=20)
    assert again.boots == 2 and again.private_ip == first.private_ip  # an EBS-backed reboot
    eventually(lambda: boots.read_text().count("boot") == 2, timeout=20)
    assert (again.home / "boots").read_text() == "boot\nboot\n"


def test_a_spot_interruption_reclaims_the_instance_when_due(ec2, sim: Simulator) -> None:
    iid = run_instance(ec2, "#!/bin/bash\nexec sleep 300\n", spot=True)
    sim.wait_for(iid, SimState.RUNNING, timeout=20)
    # The CLI's way: a request through the running simulator's state directory.
    stamp = request_interrupt(iid, sim.state_dir, in_seconds=0.5)
    assert stamp.endswith("Z")
    done = sim.wait_for(iid, SimState.TERMINATED, timeout=20)
    assert done.spot_action == {"action": "terminate", "time": stamp}
    assert ec2_state(ec2, iid) == "terminated"


def test_a_rebalance_recommendation_shows_in_imds_and_reclaims_nothing(ec2, sim: Simulator) -> None:
    iid = run_instance(ec2, "#!/bin/bash\nexec sleep 300\n", spot=True)
    running = sim.wait_for(iid, SimState.RUNNING, timeout=20)
    assert running.imds_url is not None
    path = "/latest/meta-data/events/recommendations/rebalance"
    assert imds_get(running.imds_url, path)[0] == 404
    stamp = sim.recommend_rebalance(iid)
    assert imds_get(running.imds_url, path) == (200, json.dumps({"noticeTime": stamp}))
    time.sleep(1.0)  # five polls of the simulator: the instance stays
    assert ec2_state(ec2, iid) == "running" and sim.instance(iid).state is SimState.RUNNING
    on_demand = run_instance(ec2, "#!/bin/bash\nexec sleep 300\n")
    sim.wait_for(on_demand, SimState.RUNNING, timeout=20)
    with pytest.raises(SimulatorError, match="only spot instances"):
        sim.recommend_rebalance(on_demand)


def test_fleet_instances_run_the_launch_templates_user_data(ec2, sim: Simulator) -> None:
    script = '#!/bin/bash\necho "fleet $(id -u)" > "$HOME/marker"\n'
    ec2.create_launch_template(
        LaunchTemplateName="pygirder-t-sim",
        LaunchTemplateData={
            "ImageId": AMI,
            "InstanceType": "t3.micro",
            "UserData": base64.b64encode(script.encode()).decode(),
            "TagSpecifications": managed_tags(),
        },
    )
    fleet = ec2.create_fleet(
        Type="instant",
        LaunchTemplateConfigs=[
            {
                "LaunchTemplateSpecification": {
                    "LaunchTemplateName": "pygirder-t-sim", "Version": "$Latest",
                },
                "Overrides": [{"InstanceType": "t3.micro"}, {"InstanceType": "t3.small"}],
            }
        ],
        TargetCapacitySpecification={"TotalTargetCapacity": 2, "DefaultTargetCapacityType": "spot"},
    )  # fmt: skip
    ids = [iid for batch in fleet["Instances"] for iid in batch["InstanceIds"]]
    assert len(ids) == 2
    for iid in ids:
        done = sim.wait_for(iid, SimState.EXITED, timeout=20)
        assert done.exit_status == 0 and done.lifecycle == "spot"
        assert (done.home / "marker").read_text() == f"fleet {os.getuid()}\n"
    assert len({sim.instance(iid).private_ip for iid in ids}) == 2


def test_unmanaged_instances_and_non_scripts_are_left_alone(ec2, sim: Simulator) -> None:
    ec2.run_instances(ImageId=AMI, MinCount=1, MaxCount=1, UserData="#!/bin/bash\nsleep 300\n")
    iid = run_instance(ec2, "#cloud-config\nruncmd: [[touch, /tmp/never]]\n")
    done = sim.wait_for(iid, SimState.EXITED, timeout=20)
    assert done.exit_status == 0
    assert "is not a script" in done.console_log.read_text()
    assert [i.instance_id for i in sim.instances()] == [iid]
    status = json.loads((sim.state_dir / "instances.json").read_text())
    assert [i["instance_id"] for i in status["instances"]] == [iid]


def test_refusals(aws, sim: Simulator, tmp_path: Path) -> None:
    with pytest.raises(SimulatorError, match="never AWS itself"):
        Simulator("https://ec2.us-east-1.amazonaws.com", tmp_path / "x")
    with pytest.raises(SimulatorError, match="another simulator is running"):
        Simulator(aws.url, sim.state_dir).start()
    with pytest.raises(SimulatorError, match="not a running simulated instance"):
        sim.interrupt("i-0000000000000dead")
    with pytest.raises(SimulatorError, match="no simulator is running"):
        request_interrupt("i-0000000000000dead", tmp_path / "nowhere")
    with pytest.raises(SimulatorError, match="cannot list instances"):
        Simulator("http://127.0.0.1:9", tmp_path / "closed").start()


@pytest.mark.slow
def test_the_cli_runs_interrupts_and_lists_instances(aws, ec2, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    from typer.testing import CliRunner

    from pygirder.cloud.cli import app

    state = tmp_path / "cli-sim"
    cli = subprocess.Popen(
        [sys.executable, "-m", "pygirder", "cloud", "simulate", "--endpoint", aws.url,
         "--state-dir", str(state), "--poll-interval", "0.2", "--stop-grace", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    try:
        iid = run_instance(ec2, "#!/bin/bash\nexec sleep 300\n", spot=True)

        def listed() -> bool:
            try:
                data = json.loads((state / "instances.json").read_text())
            except (OSError, ValueError):
                return False
            return [(i["instance_id"], i["state"]) for i in data["instances"]] == [(iid, "running")]

        eventually(listed, timeout=20)
        runner = CliRunner()
        result = runner.invoke(
            app, ["simulate", "interrupt", iid, "--state-dir", str(state), "--no-reclaim"]
        )
        assert result.exit_code == 0, result.output
        assert "spot interruption notice, terminate at" in result.stderr
        shown = runner.invoke(app, ["simulate", "status", "--state-dir", str(state), "--json"])
        [inst] = json.loads(shown.stdout)["instances"]
        assert inst["spot_action"]["action"] == "terminate"
        pid = inst["pid"]
        assert pid and psutil.pid_exists(pid)
    finally:
        cli.send_signal(signal.SIGINT)
        stdout, stderr = cli.communicate(timeout=30)
    assert cli.returncode == 0, stderr
    assert f"{iid}" in stderr and "booted as 127." in stderr
    assert iid in stdout  # the final table, with peak memory
    assert not psutil.pid_exists(pid)
    assert ec2_state(ec2, iid) == "running"  # stopping the simulator changes nothing on EC2
    missing = CliRunner().invoke(app, ["simulate"], env={"AWS_ENDPOINT_URL": ""})
    assert missing.exit_code == 2 and "give --endpoint URL" in missing.stderr
