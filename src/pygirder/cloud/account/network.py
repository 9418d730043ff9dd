"""The VPC and what the fleet's instances connect through: gateway, subnets, routes,
security groups.
"""

from __future__ import annotations

from typing import Any

from ..config import CloudConfig
from ..errors import NotSetUpError
from .kind import Ctx, Ec2Kind
from .model import Action, Drift, Found

# --------------------------------------------------------------------- network


class Vpc(Ec2Kind):
    key = "vpc"
    title = "VPC"
    describe_op, result_key, id_key = "describe_vpcs", "Vpcs", "VpcId"

    def check(self, ctx: Ctx, found: Found) -> list[Drift]:
        drift = []
        if found.data.get("CidrBlock") != ctx.config.vpc_cidr:
            drift.append(
                Drift(
                    Action.CONFLICT,
                    f"CIDR is {found.data.get('CidrBlock')}, config says "
                    f"{ctx.config.vpc_cidr}: run `pygirder cloud teardown` to change it",
                )
            )
        for attr in ("enableDnsSupport", "enableDnsHostnames"):
            got = ctx.ec2("describe_vpc_attribute", VpcId=found.id, Attribute=attr)
            key = attr[0].upper() + attr[1:]
            if not got.get(key, {}).get("Value"):
                drift.append(Drift(Action.UPDATE, f"{attr} is off"))
        return drift

    def create(self, ctx: Ctx) -> Found:
        vpc = ctx.ec2(
            "create_vpc",
            CidrBlock=ctx.config.vpc_cidr,
            TagSpecifications=ctx.tag_specs(self.key, "vpc", name=self.label(ctx)),
        )["Vpc"]
        found = Found(id=vpc["VpcId"], name=self.label(ctx), state=vpc["State"], data=vpc)

        def available() -> bool:
            vpcs = ctx.ec2("describe_vpcs", VpcIds=[found.id], ignore=("InvalidVpcID.NotFound",))
            return bool(vpcs and vpcs["Vpcs"] and vpcs["Vpcs"][0]["State"] == "available")

        ctx.aws.wait_for(available, what=f"VPC {found.id}", timeout=120, interval=2)
        found.state = "available"
        return self.update(ctx, found, [])

    def update(self, ctx: Ctx, found: Found, drift: list[Drift]) -> Found:
        ctx.ec2("modify_vpc_attribute", VpcId=found.id, EnableDnsSupport={"Value": True})
        ctx.ec2("modify_vpc_attribute", VpcId=found.id, EnableDnsHostnames={"Value": True})
        return found

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.delete("ec2", "delete_vpc", VpcId=found.id)

    def describe(self, ctx: Ctx, found: Found) -> str:
        return str(found.data.get("CidrBlock", ""))


class InternetGateway(Ec2Kind):
    key = "internet-gateway"
    title = "Internet gateway"
    describe_op, result_key, id_key = (
        "describe_internet_gateways",
        "InternetGateways",
        "InternetGatewayId",
    )

    def state_of(self, item: dict[str, Any]) -> str:
        attachments = item.get("Attachments", [])
        return "attached" if attachments else "detached"

    def check(self, ctx: Ctx, found: Found) -> list[Drift]:
        vpc = ctx.get("vpc")
        attached = [a["VpcId"] for a in found.data.get("Attachments", [])]
        if vpc is None or attached != [vpc.id]:
            return [Drift(Action.UPDATE, "not attached to the VPC")]
        return []

    def create(self, ctx: Ctx) -> Found:
        igw = ctx.ec2(
            "create_internet_gateway",
            TagSpecifications=ctx.tag_specs(self.key, "internet-gateway", name=self.label(ctx)),
        )["InternetGateway"]
        found = Found(id=igw["InternetGatewayId"], name=self.label(ctx), data=igw)
        return self.update(ctx, found, [])

    def update(self, ctx: Ctx, found: Found, drift: list[Drift]) -> Found:
        vpc = ctx.require("vpc").id
        for attachment in found.data.get("Attachments", []):
            if attachment["VpcId"] != vpc:
                ctx.ec2(
                    "detach_internet_gateway", InternetGatewayId=found.id, VpcId=attachment["VpcId"]
                )
        if vpc not in [a["VpcId"] for a in found.data.get("Attachments", [])]:
            ctx.ec2("attach_internet_gateway", InternetGatewayId=found.id, VpcId=vpc)
        found.data["Attachments"] = [{"VpcId": vpc, "State": "available"}]
        found.state = "attached"
        return found

    def delete(self, ctx: Ctx, found: Found) -> None:
        for attachment in found.data.get("Attachments", []):
            ctx.delete(
                "ec2",
                "detach_internet_gateway",
                InternetGatewayId=found.id,
                VpcId=attachment["VpcId"],
            )
        ctx.delete("ec2", "delete_internet_gateway", InternetGatewayId=found.id)


class Subnet(Ec2Kind):
    describe_op, result_key, id_key = "describe_subnets", "Subnets", "SubnetId"

    def __init__(self, public: bool) -> None:
        self.public = public
        self.key = "public-subnet" if public else "private-subnet"
        self.title = "Public subnet" if public else "Private subnet"

    def cidr(self, config: CloudConfig) -> str:
        return config.public_subnet_cidr if self.public else config.private_subnet_cidr

    def check(self, ctx: Ctx, found: Found) -> list[Drift]:
        drift = []
        cidr, zone = found.data.get("CidrBlock"), found.data.get("AvailabilityZone")
        if cidr != self.cidr(ctx.config) or zone != ctx.config.zone:
            drift.append(
                Drift(
                    Action.CONFLICT,
                    f"is {cidr} in {zone}, config says {self.cidr(ctx.config)} in "
                    f"{ctx.config.zone}: run `pygirder cloud teardown` to change it",
                )
            )
        if bool(found.data.get("MapPublicIpOnLaunch")) != self.public:
            drift.append(Drift(Action.UPDATE, "public IPs on launch are set wrongly"))
        return drift

    def create(self, ctx: Ctx) -> Found:
        subnet = ctx.ec2(
            "create_subnet",
            VpcId=ctx.require("vpc").id,
            CidrBlock=self.cidr(ctx.config),
            AvailabilityZone=ctx.config.zone,
            TagSpecifications=ctx.tag_specs(self.key, "subnet", name=self.label(ctx)),
        )["Subnet"]
        found = Found(id=subnet["SubnetId"], name=self.label(ctx), data=subnet)
        if self.public:
            self.update(ctx, found, [])
        return found

    def update(self, ctx: Ctx, found: Found, drift: list[Drift]) -> Found:
        ctx.ec2(
            "modify_subnet_attribute",
            SubnetId=found.id,
            MapPublicIpOnLaunch={"Value": self.public},
        )
        found.data["MapPublicIpOnLaunch"] = self.public
        return found

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.delete("ec2", "delete_subnet", SubnetId=found.id)

    def describe(self, ctx: Ctx, found: Found) -> str:
        return f"{found.data.get('CidrBlock')} in {found.data.get('AvailabilityZone')}"


class RouteTable(Ec2Kind):
    describe_op, result_key, id_key = "describe_route_tables", "RouteTables", "RouteTableId"

    def __init__(self, public: bool) -> None:
        self.public = public
        self.key = "public-routes" if public else "private-routes"
        self.title = "Public route table" if public else "Private route table"
        self.subnet_key = "public-subnet" if public else "private-subnet"

    def target(self, ctx: Ctx) -> tuple[str, str] | None:
        """The default route's (parameter, id): internet gateway or NAT."""
        if self.public:
            igw = ctx.get("internet-gateway")
            return ("GatewayId", igw.id) if igw else None
        if ctx.config.nat == "gateway":
            nat = ctx.get("nat-gateway")
            return ("NatGatewayId", nat.id) if nat else None
        nat = ctx.get("nat-instance")
        return ("NetworkInterfaceId", nat.data["NetworkInterfaceId"]) if nat else None

    @staticmethod
    def default_route(found: Found) -> dict[str, Any] | None:
        for route in found.data.get("Routes", []):
            if route.get("DestinationCidrBlock") == "0.0.0.0/0":
                return route
        return None

    def check(self, ctx: Ctx, found: Found) -> list[Drift]:
        drift = []
        target = self.target(ctx)
        route = self.default_route(found)
        if target is None or route is None or route.get(target[0]) != target[1]:
            via = "the internet gateway" if self.public else f"the NAT {ctx.config.nat}"
            drift.append(Drift(Action.UPDATE, f"default route does not go through {via}"))
        subnet = ctx.get(self.subnet_key)
        subnets = [a.get("SubnetId") for a in found.data.get("Associations", [])]
        if subnet is None or subnet.id not in subnets:
            drift.append(Drift(Action.UPDATE, f"not associated with the {self.subnet_key}"))
        return drift

    def create(self, ctx: Ctx) -> Found:
        table = ctx.ec2(
            "create_route_table",
            VpcId=ctx.require("vpc").id,
            TagSpecifications=ctx.tag_specs(self.key, "route-table", name=self.label(ctx)),
        )["RouteTable"]
        found = Found(id=table["RouteTableId"], name=self.label(ctx), data=table)
        return self.update(ctx, found, [])

    def update(self, ctx: Ctx, found: Found, drift: list[Drift]) -> Found:
        target = self.target(ctx)
        if target is None:
            raise NotSetUpError(f"no target for the default route of {found.id}", missing=[])
        route = self.default_route(found)
        if route is None:
            ctx.ec2(
                "create_route",
                RouteTableId=found.id,
                DestinationCidrBlock="0.0.0.0/0",
                **{target[0]: target[1]},
            )
        elif route.get(target[0]) != target[1]:
            ctx.ec2(
                "replace_route",
                RouteTableId=found.id,
                DestinationCidrBlock="0.0.0.0/0",
                **{target[0]: target[1]},
            )
        subnet = ctx.require(self.subnet_key).id
        if subnet not in [a.get("SubnetId") for a in found.data.get("Associations", [])]:
            ctx.ec2("associate_route_table", RouteTableId=found.id, SubnetId=subnet)
        refreshed = ctx.ec2("describe_route_tables", RouteTableIds=[found.id])["RouteTables"]
        found.data = refreshed[0] if refreshed else found.data
        return found

    def delete(self, ctx: Ctx, found: Found) -> None:
        for assoc in found.data.get("Associations", []):
            if not assoc.get("Main"):
                ctx.delete(
                    "ec2",
                    "disassociate_route_table",
                    AssociationId=assoc["RouteTableAssociationId"],
                )
        ctx.delete("ec2", "delete_route_table", RouteTableId=found.id)

    def describe(self, ctx: Ctx, found: Found) -> str:
        route = self.default_route(found) or {}
        via = (
            route.get("GatewayId")
            or route.get("NatGatewayId")
            or route.get("NetworkInterfaceId")
            or "nothing"
        )
        state = route.get("State", "")
        return f"0.0.0.0/0 -> {via}" + (f" ({state})" if state and state != "active" else "")


Rule = tuple[str, int, int, str, str]  # protocol, from port, to port, "cidr"|"sg", source


class SecurityGroup(Ec2Kind):
    describe_op, result_key, id_key = "describe_security_groups", "SecurityGroups", "GroupId"

    def __init__(self, nat: bool) -> None:
        self.nat = nat
        self.key = "nat-sg" if nat else "cluster-sg"
        self.title = "NAT security group" if nat else "Cluster security group"

    def wanted(self, config: CloudConfig) -> bool:
        return config.nat == "instance" if self.nat else True

    def label(self, ctx: Ctx) -> str:
        return ctx.config.resource_name("nat" if self.nat else "cluster")

    def rules(self, ctx: Ctx, group_id: str) -> set[Rule]:
        if self.nat:  # the NAT forwards anything from inside the VPC
            return {("-1", -1, -1, "cidr", ctx.config.vpc_cidr)}
        rules: set[Rule] = {("-1", -1, -1, "sg", group_id)}
        if ctx.config.ssh_from:
            rules.add(("tcp", 22, 22, "cidr", ctx.config.ssh_from))
        return rules

    def check(self, ctx: Ctx, found: Found) -> list[Drift]:
        have = _rules(found.data.get("IpPermissions", []))
        want = self.rules(ctx, found.id)
        drift = []
        for rule in sorted(want - have):
            drift.append(Drift(Action.UPDATE, f"missing ingress {_rule_text(rule)}"))
        for rule in sorted(have - want):
            drift.append(Drift(Action.UPDATE, f"unexpected ingress {_rule_text(rule)}"))
        return drift

    def create(self, ctx: Ctx) -> Found:
        what = "the NAT instance" if self.nat else "pygirder instances"
        group = ctx.ec2(
            "create_security_group",
            GroupName=self.label(ctx),
            Description=f"{what} of pygirder setup {ctx.name}",
            VpcId=ctx.require("vpc").id,
            TagSpecifications=ctx.tag_specs(self.key, "security-group", name=self.label(ctx)),
        )
        found = Found(id=group["GroupId"], name=self.label(ctx), data={"IpPermissions": []})
        return self.update(ctx, found, [])

    def update(self, ctx: Ctx, found: Found, drift: list[Drift]) -> Found:
        have = _rules(found.data.get("IpPermissions", []))
        want = self.rules(ctx, found.id)
        if have - want:
            ctx.ec2(
                "revoke_security_group_ingress",
                GroupId=found.id,
                IpPermissions=[_permission(r) for r in sorted(have - want)],
            )
        if want - have:
            ctx.ec2(
                "authorize_security_group_ingress",
                GroupId=found.id,
                IpPermissions=[_permission(r) for r in sorted(want - have)],
                TagSpecifications=ctx.tag_specs(self.key, "security-group-rule"),
            )
        found.data["IpPermissions"] = [_permission(r) for r in sorted(want)]
        return found

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.delete("ec2", "delete_security_group", GroupId=found.id)

    def describe(self, ctx: Ctx, found: Found) -> str:
        rules = _rules(found.data.get("IpPermissions", []))
        return "; ".join(_rule_text(r, self_id=found.id) for r in sorted(rules))


def _rules(permissions: list[dict[str, Any]]) -> set[Rule]:
    out: set[Rule] = set()
    for perm in permissions:
        proto = str(perm.get("IpProtocol", "-1"))
        lo, hi = (-1, -1) if proto == "-1" else (perm.get("FromPort", -1), perm.get("ToPort", -1))
        for rng in perm.get("IpRanges", []):
            out.add((proto, lo, hi, "cidr", rng["CidrIp"]))
        for pair in perm.get("UserIdGroupPairs", []):
            out.add((proto, lo, hi, "sg", pair["GroupId"]))
        for rng in perm.get("Ipv6Ranges", []):
            out.add((proto, lo, hi, "cidr6", rng["CidrIpv6"]))
        for pl in perm.get("PrefixListIds", []):
            out.add((proto, lo, hi, "pl", pl["PrefixListId"]))
    return out


def _permission(rule: Rule) -> dict[str, Any]:
    proto, lo, hi, kind, source = rule
    perm: dict[str, Any] = {"IpProtocol": proto}
    if proto != "-1":
        perm.update(FromPort=lo, ToPort=hi)
    if kind == "cidr":
        perm["IpRanges"] = [{"CidrIp": source, "Description": "pygirder"}]
    elif kind == "sg":
        perm["UserIdGroupPairs"] = [{"GroupId": source, "Description": "pygirder"}]
    elif kind == "cidr6":
        perm["Ipv6Ranges"] = [{"CidrIpv6": source}]
    else:
        perm["PrefixListIds"] = [{"PrefixListId": source}]
    return perm


def _rule_text(rule: Rule, self_id: str = "") -> str:
    proto, lo, hi, kind, source = rule
    what = "all traffic" if proto == "-1" else f"{proto}/{lo}" + (f"-{hi}" if hi != lo else "")
    who = "the group itself" if kind == "sg" and source == self_id else source
    return f"{what} from {who}"
