"""The private subnet's way out: a NAT instance (with its cloud-init script) or a NAT
gateway with its address, and the S3 gateway endpoint.
"""

from __future__ import annotations

import uuid
from typing import Any

from ..config import CloudConfig, CloudConfigError
from ..errors import CloudError
from ..leftovers import instance_monthly_usd
from ..pricing import HOURS_PER_MONTH, PRICE_NAT_GATEWAY_HOUR, PRICE_PUBLIC_IPV4_HOUR
from ..tags import (
    ec2_filters,
)
from .kind import WAIT_INSTANCE, WAIT_NAT_GATEWAY, Ctx, Ec2Kind
from .model import Action, Drift, Found

# ------------------------------------------------------------------------- NAT

NAT_USER_DATA = """\
#cloud-config
# pygirder NAT instance: masquerade the VPC's private subnet.  The script runs on
# every boot (a systemd unit), so the instance may be stopped and started any time.
write_files:
  - path: /etc/sysctl.d/90-pygirder-nat.conf
    permissions: "0644"
    content: |
      net.ipv4.ip_forward = 1
  - path: /usr/local/sbin/pygirder-nat
    permissions: "0755"
    content: |
      #!/bin/sh
      set -eu
      sysctl -q -w net.ipv4.ip_forward=1
      if ! command -v iptables >/dev/null 2>&1; then
          dnf install -y -q iptables-nft
      fi
      iface=$(ip -o -4 route show to default | awk '{{print $5; exit}}')
      iptables -t nat -C POSTROUTING -o "$iface" -s {cidr} -j MASQUERADE 2>/dev/null \\
          || iptables -t nat -A POSTROUTING -o "$iface" -s {cidr} -j MASQUERADE
      iptables -C FORWARD -s {cidr} -j ACCEPT 2>/dev/null \\
          || iptables -I FORWARD -s {cidr} -j ACCEPT
      iptables -C FORWARD -d {cidr} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT \\
          2>/dev/null \\
          || iptables -I FORWARD -d {cidr} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
  - path: /etc/systemd/system/pygirder-nat.service
    permissions: "0644"
    content: |
      [Unit]
      Description=pygirder NAT for {cidr}
      Wants=network-online.target
      After=network-online.target
      [Service]
      Type=oneshot
      RemainAfterExit=yes
      ExecStart=/usr/local/sbin/pygirder-nat
      Restart=on-failure
      RestartSec=10
      [Install]
      WantedBy=multi-user.target
runcmd:
  - [systemctl, daemon-reload]
  - [systemctl, enable, --now, pygirder-nat.service]
"""


def nat_user_data(vpc_cidr: str) -> str:
    """cloud-init user data that turns an Amazon Linux 2023 instance into a NAT."""
    return NAT_USER_DATA.format(cidr=vpc_cidr)


class NatInstance(Ec2Kind):
    """A small instance that NATs the private subnet; kept stopped while idle."""

    key = "nat-instance"
    title = "NAT instance"
    describe_op, result_key = "describe_instances", "Reservations"
    gone_states = frozenset({"terminated"})

    def wanted(self, config: CloudConfig) -> bool:
        return config.nat == "instance"

    def label(self, ctx: Ctx) -> str:
        return ctx.config.resource_name("nat")

    def find(self, ctx: Ctx) -> list[Found]:
        reservations = ctx.describe(
            "describe_instances", "Reservations", Filters=ec2_filters(ctx.name, self.key)
        )
        return [
            self._found(ctx, inst)
            for r in reservations
            for inst in r.get("Instances", [])
            if inst["State"]["Name"] not in self.gone_states
        ]

    def _found(self, ctx: Ctx, inst: dict[str, Any]) -> Found:
        enis = inst.get("NetworkInterfaces") or [{}]
        data = dict(inst, NetworkInterfaceId=enis[0].get("NetworkInterfaceId", ""))
        return Found(
            id=inst["InstanceId"], name=self.label(ctx), state=inst["State"]["Name"], data=data
        )

    def check(self, ctx: Ctx, found: Found) -> list[Drift]:
        if found.state in ("shutting-down", "stopping"):
            return []
        if found.data.get("SourceDestCheck", True):
            return [Drift(Action.UPDATE, "source/destination check is on (no forwarding)")]
        return []

    def _ami_and_disk(self, ctx: Ctx, instance_type: str) -> tuple[str, list[dict[str, Any]]]:
        try:
            types = ctx.ec2("describe_instance_types", InstanceTypes=[instance_type])
        except CloudError as exc:
            if exc.code == "InvalidInstanceType":
                raise CloudConfigError(
                    f"[cloud] nat_instance_type {instance_type!r} does not exist in "
                    f"{ctx.region}; use e.g. 't4g.nano' or 't3.nano'",
                    problems=[("nat_instance_type", instance_type, "an EC2 instance type")],
                ) from exc
            raise
        offers = ctx.ec2(
            "describe_instance_type_offerings",
            LocationType="availability-zone",
            Filters=[
                {"Name": "instance-type", "Values": [instance_type]},
                {"Name": "location", "Values": [ctx.config.zone]},
            ],
        )
        if not offers.get("InstanceTypeOfferings"):
            raise CloudConfigError(
                f"[cloud] nat_instance_type {instance_type!r} is not offered in zone "
                f"{ctx.config.zone}; choose another type (e.g. 't3.nano') or zone",
                problems=[("nat_instance_type", instance_type, "a type offered in the zone")],
            )
        arches = types["InstanceTypes"][0]["ProcessorInfo"]["SupportedArchitectures"]
        arch = "arm64" if "arm64" in arches else "x86_64"
        parameter = f"/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-{arch}"
        ami = ctx.call("ssm", "get_parameter", Name=parameter)["Parameter"]["Value"]
        images = ctx.ec2("describe_images", ImageIds=[ami]).get("Images", [])
        disks: list[dict[str, Any]] = []
        if images and images[0].get("RootDeviceName"):
            root = images[0]["RootDeviceName"]
            sizes = [
                m["Ebs"].get("VolumeSize")
                for m in images[0].get("BlockDeviceMappings", [])
                if m.get("DeviceName") == root and m.get("Ebs")
            ]
            disks = [
                {
                    "DeviceName": root,
                    "Ebs": {
                        "VolumeSize": (sizes[0] if sizes and sizes[0] else 8),
                        "VolumeType": "gp3",
                        "Encrypted": True,
                        "DeleteOnTermination": True,
                    },
                }
            ]
        return ami, disks

    def create(self, ctx: Ctx) -> Found:
        instance_type = ctx.config.nat_instance_type
        ami, disks = self._ami_and_disk(ctx, instance_type)
        params: dict[str, Any] = {
            "ImageId": ami,
            "InstanceType": instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "SubnetId": ctx.require("public-subnet").id,
            "SecurityGroupIds": [ctx.require("nat-sg").id],
            "UserData": nat_user_data(ctx.config.vpc_cidr),
            "MetadataOptions": {
                "HttpTokens": "required",
                "HttpEndpoint": "enabled",
                "HttpPutResponseHopLimit": 1,
            },
            "InstanceInitiatedShutdownBehavior": "stop",
            "ClientToken": f"pygirder-nat-{uuid.uuid4().hex}",
            "TagSpecifications": ctx.tag_specs(
                self.key, "instance", "volume", "network-interface", name=self.label(ctx)
            ),
        }
        if disks:
            params["BlockDeviceMappings"] = disks
        inst = ctx.ec2("run_instances", **params)["Instances"][0]
        iid = inst["InstanceId"]
        ctx.say(f"  launched NAT instance {iid}; waiting for it to run")
        self._wait_state(ctx, iid, "running")
        ctx.ec2("modify_instance_attribute", InstanceId=iid, SourceDestCheck={"Value": False})
        # It configures itself on every boot, so it can be stopped at once: it costs
        # only its disk until a fleet needs it.
        ctx.ec2("stop_instances", InstanceIds=[iid])
        ctx.say(f"  stopping NAT instance {iid} until a fleet needs it")
        return self._found(ctx, self._wait_state(ctx, iid, "stopped"))

    def update(self, ctx: Ctx, found: Found, drift: list[Drift]) -> Found:
        ctx.ec2("modify_instance_attribute", InstanceId=found.id, SourceDestCheck={"Value": False})
        found.data["SourceDestCheck"] = False
        return found

    def _wait_state(self, ctx: Ctx, iid: str, state: str) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            got = ctx.ec2(
                "describe_instances", InstanceIds=[iid], ignore=("InvalidInstanceID.NotFound",)
            )
            for r in (got or {}).get("Reservations", []):
                for inst in r.get("Instances", []):
                    if inst["State"]["Name"] == state:
                        return inst
            return None

        return ctx.aws.wait_for(
            reached,
            what=f"instance {iid} to be {state}",
            timeout=WAIT_INSTANCE[0],
            interval=WAIT_INSTANCE[1],
        )

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.terminate([found.id])

    def monthly_usd(self, ctx: Ctx, found: Found) -> float | None:
        return instance_monthly_usd(ctx.aws, found.data)

    def describe(self, ctx: Ctx, found: Found) -> str:
        return str(found.data.get("InstanceType", ""))


class NatAddress(Ec2Kind):
    key = "nat-address"
    title = "NAT elastic IP"
    describe_op, result_key, id_key = "describe_addresses", "Addresses", "AllocationId"

    def wanted(self, config: CloudConfig) -> bool:
        return config.nat == "gateway"

    def state_of(self, item: dict[str, Any]) -> str:
        return "associated" if item.get("AssociationId") else "allocated"

    def create(self, ctx: Ctx) -> Found:
        got = ctx.ec2(
            "allocate_address",
            Domain="vpc",
            TagSpecifications=ctx.tag_specs(self.key, "elastic-ip", name=self.label(ctx)),
        )
        return Found(id=got["AllocationId"], name=self.label(ctx), state="allocated", data=got)

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.delete("ec2", "release_address", AllocationId=found.id)

    def monthly_usd(self, ctx: Ctx, found: Found) -> float | None:
        return PRICE_PUBLIC_IPV4_HOUR * HOURS_PER_MONTH

    def describe(self, ctx: Ctx, found: Found) -> str:
        return str(found.data.get("PublicIp", ""))


class NatGateway(Ec2Kind):
    key = "nat-gateway"
    title = "NAT gateway"
    describe_op, result_key, id_key = "describe_nat_gateways", "NatGateways", "NatGatewayId"
    gone_states = frozenset({"deleted", "failed"})

    def wanted(self, config: CloudConfig) -> bool:
        return config.nat == "gateway"

    def create(self, ctx: Ctx) -> Found:
        nat = ctx.ec2(
            "create_nat_gateway",
            SubnetId=ctx.require("public-subnet").id,
            AllocationId=ctx.require("nat-address").id,
            ClientToken=f"pygirder-nat-{uuid.uuid4().hex}",
            TagSpecifications=ctx.tag_specs(self.key, "natgateway", name=self.label(ctx)),
        )["NatGateway"]
        nid = nat["NatGatewayId"]
        ctx.say(f"  waiting for NAT gateway {nid} to become available (a few minutes)")

        def available() -> dict[str, Any] | None:
            got = ctx.ec2("describe_nat_gateways", NatGatewayIds=[nid])["NatGateways"]
            if got and got[0]["State"] == "failed":
                raise CloudError(
                    f"NAT gateway {nid} failed: {got[0].get('FailureMessage', 'no reason')}",
                    code=got[0].get("FailureCode", "NatGatewayFailed"),
                )
            return got[0] if got and got[0]["State"] == "available" else None

        nat = ctx.aws.wait_for(
            available,
            what=f"NAT gateway {nid}",
            timeout=WAIT_NAT_GATEWAY[0],
            interval=WAIT_NAT_GATEWAY[1],
        )
        return Found(id=nid, name=self.label(ctx), state="available", data=nat)

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.delete("ec2", "delete_nat_gateway", NatGatewayId=found.id)

        def deleted() -> bool:
            got = ctx.ec2(
                "describe_nat_gateways",
                NatGatewayIds=[found.id],
                ignore=("NatGatewayNotFound", "InvalidNatGatewayID.NotFound"),
            )
            gws = (got or {}).get("NatGateways", [])
            return not gws or gws[0]["State"] in ("deleted", "failed")

        ctx.aws.wait_for(
            deleted,
            what=f"NAT gateway {found.id} to be deleted",
            timeout=WAIT_NAT_GATEWAY[0],
            interval=WAIT_NAT_GATEWAY[1],
        )

    def monthly_usd(self, ctx: Ctx, found: Found) -> float | None:
        return PRICE_NAT_GATEWAY_HOUR * HOURS_PER_MONTH


class S3Endpoint(Ec2Kind):
    """Gateway endpoint: private instances reach S3 without the NAT (and for free)."""

    key = "s3-endpoint"
    title = "S3 gateway endpoint"
    describe_op, result_key, id_key = "describe_vpc_endpoints", "VpcEndpoints", "VpcEndpointId"
    gone_states = frozenset({"deleted", "deleting", "Deleted", "Deleting"})

    def service_name(self, ctx: Ctx) -> str:
        prefix = "cn.com.amazonaws" if ctx.partition == "aws-cn" else "com.amazonaws"
        return f"{prefix}.{ctx.region}.s3"

    def route_tables(self, ctx: Ctx) -> list[str]:
        return [t.id for t in (ctx.get("public-routes"), ctx.get("private-routes")) if t]

    def check(self, ctx: Ctx, found: Found) -> list[Drift]:
        missing = set(self.route_tables(ctx)) - set(found.data.get("RouteTableIds", []))
        if missing or len(self.route_tables(ctx)) < 2:
            return [Drift(Action.UPDATE, "not attached to both route tables")]
        return []

    def create(self, ctx: Ctx) -> Found:
        ep = ctx.ec2(
            "create_vpc_endpoint",
            VpcId=ctx.require("vpc").id,
            ServiceName=self.service_name(ctx),
            VpcEndpointType="Gateway",
            RouteTableIds=self.route_tables(ctx),
            ClientToken=f"pygirder-s3-{uuid.uuid4().hex}",
            TagSpecifications=ctx.tag_specs(self.key, "vpc-endpoint", name=self.label(ctx)),
        )["VpcEndpoint"]
        return Found(id=ep["VpcEndpointId"], name=self.label(ctx), state=ep["State"], data=ep)

    def update(self, ctx: Ctx, found: Found, drift: list[Drift]) -> Found:
        missing = sorted(set(self.route_tables(ctx)) - set(found.data.get("RouteTableIds", [])))
        if missing:
            ctx.ec2("modify_vpc_endpoint", VpcEndpointId=found.id, AddRouteTableIds=missing)
        return found

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.delete("ec2", "delete_vpc_endpoints", VpcEndpointIds=[found.id])

    def describe(self, ctx: Ctx, found: Found) -> str:
        return str(found.data.get("ServiceName", ""))
