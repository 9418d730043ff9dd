"""Fixtures of the fleet tests: a running fleet on moto, the drain side of agents."""

from __future__ import annotations

from typing import Any

import pytest
from fleet_helpers import TYPES, DrainAgents, StandInAgents, amazon_image, write_project

from pygirder.cloud.account import account_resources, setup
from pygirder.cloud.artifacts import build_artifact, push_artifact
from pygirder.cloud.fleet.launch import UpOptions, up
from pygirder.cloud.fleet.teardown import down


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("converge-artifact")
    return build_artifact(write_project(root), root / "out")


@pytest.fixture
def fleet(make_aws, config, built, boto) -> Any:
    """A running fleet of 2 workers (stand-in agents announce), removed afterwards."""
    aws_, faults, _ = make_aws(config)
    setup(config, aws=aws_)
    res = account_resources(config, aws=aws_)
    push_artifact(built, res["bucket"], res["artifact_prefix"])
    image = amazon_image(boto("ec2"))
    agents = StandInAgents(boto("ec2"), res["topic_arn"])
    agents.start()
    summary = up(
        config,
        UpOptions(workers=2, instance_types=TYPES, image_id=image, deadline_s=20,
                  image_ids=(amazon_image(boto("ec2"), "arm64"),),
                  backoff_s=(0.2, 1.0), processes="1"),
        aws=aws_,
    )  # fmt: skip
    yield {"config": config, "aws": aws_, "fleet": summary.fleet, "res": res, "faults": faults,
           "agents": agents}  # fmt: skip
    agents.stop()
    down(config, summary.fleet, aws=aws_)


@pytest.fixture
def drain_agents():
    """``drain_agents(url, fleet, ids)``: each instance confirms a drain as its agent would."""
    started: list[DrainAgents] = []

    def start(url: str, fleet: str, ids: list[str]) -> DrainAgents:
        agents = DrainAgents(url, fleet, ids)
        started.append(agents)
        return agents

    yield start
    for agents in started:
        agents.stop()
