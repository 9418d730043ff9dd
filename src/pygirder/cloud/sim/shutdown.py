"""``shutdown -h now`` of a simulated instance: runs *inside* the instance.

A simulated instance's ``PYGIRDER_SHUTDOWN_COMMAND`` is
``python -m pygirder.cloud.sim.shutdown <id> --region R``: it stops or terminates
the instance through the EC2 API of the endpoint (its environment's endpoint and
credentials), following its InstanceInitiatedShutdownBehavior, so a time-to-live
ends it as on EC2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def shut_down_instance(instance_id: str, region: str) -> str:
    """What ``shutdown -h now`` does on EC2: stop or terminate, as the instance was launched.

    Uses the environment's endpoint and credentials (a simulated instance's).
    """
    import boto3

    ec2 = boto3.client("ec2", region_name=region)
    attr = ec2.describe_instance_attribute(
        InstanceId=instance_id, Attribute="instanceInitiatedShutdownBehavior"
    )
    behaviour = (attr.get("InstanceInitiatedShutdownBehavior") or {}).get("Value") or "stop"
    if behaviour == "terminate":
        ec2.terminate_instances(InstanceIds=[instance_id])
    else:
        ec2.stop_instances(InstanceIds=[instance_id])
    return behaviour


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pygirder.cloud.sim.shutdown ID``: shut a simulated instance down."""
    parser = argparse.ArgumentParser(prog="python -m pygirder.cloud.sim.shutdown")
    parser.add_argument("instance_id")
    parser.add_argument("--region", default="us-east-1")
    args = parser.parse_args(argv)
    behaviour = shut_down_instance(args.instance_id, args.region)
    print(f"shutdown: {args.instance_id} ({behaviour} on shutdown)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
