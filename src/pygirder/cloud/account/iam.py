"""IAM kinds: the permissions boundary, the instance role and its instance profile."""

from __future__ import annotations

import json
from typing import Any

from ..config import RESULT_PREFIX
from ..policy import (
    BOUNDARY_NAME,
    BOUNDARY_PATH,
    ROLE_PATH,
    boundary_arn,
    boundary_policy,
    instance_role_policy,
    instance_trust_policy,
)
from ..tags import (
    MANAGED_VALUE,
    TAG_MANAGED,
    as_tag_list,
    from_tag_list,
    is_owned,
)
from .kind import INLINE_POLICY_NAME, WAIT_PROFILE, Ctx, Kind
from .model import Action, Drift, Found, as_json, same_json

# ------------------------------------------------------------------------ IAM


class PermissionsBoundary(Kind):
    """The permissions boundary of every role pygirder creates: one per account.

    Setup creates it when it is missing and otherwise only checks it: the operator
    policy allows creating it but never changing or deleting it, so that nobody holding
    that policy can widen what an instance role may do.  Teardown leaves it (it costs
    nothing and other setups of the account use it).
    """

    key = "boundary"
    title = "Permissions boundary"
    shared = True

    def label(self, ctx: Ctx) -> str:
        return BOUNDARY_NAME

    def find(self, ctx: Ctx) -> list[Found]:
        arn = boundary_arn(ctx.partition, ctx.account_id)
        got = ctx.call("iam", "get_policy", PolicyArn=arn, ignore=("NoSuchEntity",))
        if got is None:
            return []
        policy = got["Policy"]
        return [Found(id=policy["PolicyName"], name=BOUNDARY_NAME, arn=arn, data=policy)]

    def check(self, ctx: Ctx, found: Found) -> list[Drift]:
        version = ctx.call(
            "iam",
            "get_policy_version",
            PolicyArn=found.arn,
            VersionId=found.data.get("DefaultVersionId", "v1"),
        )["PolicyVersion"]
        if same_json(as_json(version.get("Document")), boundary_policy(ctx.partition)):
            return []
        return [
            Drift(
                Action.CONFLICT,
                f"{found.arn} differs from the boundary this pygirder sets, and the "
                "operator policy may not change it: an administrator must update it "
                "(`pygirder cloud policy --boundary > boundary.json; aws iam "
                f"create-policy-version --policy-arn {found.arn} --set-as-default "
                "--policy-document file://boundary.json`)",
            )
        ]

    def create(self, ctx: Ctx) -> Found:
        policy = ctx.call(
            "iam",
            "create_policy",
            PolicyName=BOUNDARY_NAME,
            Path=BOUNDARY_PATH,
            PolicyDocument=json.dumps(boundary_policy(ctx.partition)),
            Description="pygirder: the most any role pygirder creates may do",
            Tags=as_tag_list({TAG_MANAGED: MANAGED_VALUE}),
        )["Policy"]
        return Found(id=policy["PolicyName"], name=BOUNDARY_NAME, arn=policy["Arn"], data=policy)

    def delete(self, ctx: Ctx, found: Found) -> None:
        """Never: the boundary outlives every setup (see the class)."""

    def describe(self, ctx: Ctx, found: Found) -> str:
        return "shared by every setup of the account; teardown keeps it"


class InstanceRole(Kind):
    key = "role"
    title = "Instance role"

    def label(self, ctx: Ctx) -> str:
        return ctx.config.resource_name("instance")

    def policy(self, ctx: Ctx) -> dict[str, Any]:
        return instance_role_policy(
            name=ctx.name,
            region=ctx.region,
            account_id=ctx.account_id,
            bucket=ctx.bucket,
            artifact_prefix=ctx.config.artifact_prefix,
            topic_arn=ctx.status_topic_arn,
            result_prefix=RESULT_PREFIX,
        )

    def find(self, ctx: Ctx) -> list[Found]:
        got = ctx.call("iam", "get_role", RoleName=self.label(ctx), ignore=("NoSuchEntity",))
        if got is None:
            return []
        role = got["Role"]
        tags = role.get("Tags")
        if tags is None:
            tags = ctx.call("iam", "list_role_tags", RoleName=role["RoleName"])["Tags"]
        if not is_owned(from_tag_list(tags), ctx.name):
            return self.clash(ctx, f"IAM role {role['RoleName']}")
        return [Found(id=role["RoleName"], name=role["RoleName"], arn=role["Arn"], data=role)]

    def check(self, ctx: Ctx, found: Found) -> list[Drift]:
        drift = []
        trust = as_json(found.data.get("AssumeRolePolicyDocument"))
        if not same_json(trust, instance_trust_policy()):
            # The operator may not edit trust policies: the role is made again.
            drift.append(Drift(Action.UPDATE, "trust policy differs (the role is re-created)"))
            return drift
        boundary = (found.data.get("PermissionsBoundary") or {}).get("PermissionsBoundaryArn")
        if boundary != boundary_arn(ctx.partition, ctx.account_id):
            drift.append(Drift(Action.UPDATE, "permissions boundary missing"))
        got = ctx.call(
            "iam",
            "get_role_policy",
            RoleName=found.id,
            PolicyName=INLINE_POLICY_NAME,
            ignore=("NoSuchEntity",),
        )
        if got is None:
            drift.append(Drift(Action.UPDATE, "least-privilege policy missing"))
        elif not same_json(as_json(got["PolicyDocument"]), self.policy(ctx)):
            drift.append(Drift(Action.UPDATE, "least-privilege policy differs"))
        return drift

    def create(self, ctx: Ctx) -> Found:
        name = self.label(ctx)
        role = ctx.call(
            "iam",
            "create_role",
            Path=ROLE_PATH,
            RoleName=name,
            AssumeRolePolicyDocument=json.dumps(instance_trust_policy()),
            Description=f"pygirder instances of {ctx.name!r}: read artifacts, publish status",
            PermissionsBoundary=boundary_arn(ctx.partition, ctx.account_id),
            Tags=as_tag_list(ctx.tags(self.key)),
        )["Role"]
        self._put_policy(ctx, name)
        return Found(id=name, name=name, arn=role["Arn"], data=role)

    def update(self, ctx: Ctx, found: Found, drift: list[Drift]) -> Found:
        texts = {d.text for d in drift}
        if any(t.startswith("trust policy") for t in texts):
            profiles = [
                profile["InstanceProfileName"]
                for page in ctx.aws.pages(
                    "iam", "list_instance_profiles_for_role", token="Marker", RoleName=found.id
                )
                for profile in page.get("InstanceProfiles", [])
            ]
            self.delete(ctx, found)
            result = self.create(ctx)
            for profile in profiles:
                ctx.retry_codes(
                    lambda profile=profile: ctx.call(
                        "iam",
                        "add_role_to_instance_profile",
                        InstanceProfileName=profile,
                        RoleName=result.id,
                    ),
                    codes=("NoSuchEntity",),
                    what=f"IAM role {result.id} to become visible",
                    wait=WAIT_PROFILE,
                )
            return result
        if "permissions boundary missing" in texts:
            ctx.call(
                "iam",
                "put_role_permissions_boundary",
                RoleName=found.id,
                PermissionsBoundary=boundary_arn(ctx.partition, ctx.account_id),
            )
        self._put_policy(ctx, found.id)
        return found

    def _put_policy(self, ctx: Ctx, role: str) -> None:
        ctx.retry_codes(
            lambda: ctx.call(
                "iam",
                "put_role_policy",
                RoleName=role,
                PolicyName=INLINE_POLICY_NAME,
                PolicyDocument=json.dumps(self.policy(ctx)),
            ),
            codes=("NoSuchEntity",),
            what=f"IAM role {role} to become visible",
            wait=WAIT_PROFILE,
        )

    def delete(self, ctx: Ctx, found: Found) -> None:
        role = found.id
        for page in ctx.aws.pages(
            "iam", "list_instance_profiles_for_role", token="Marker", RoleName=role
        ):
            for profile in page.get("InstanceProfiles", []):
                ctx.delete(
                    "iam",
                    "remove_role_from_instance_profile",
                    InstanceProfileName=profile["InstanceProfileName"],
                    RoleName=role,
                )
        for page in ctx.aws.pages("iam", "list_role_policies", token="Marker", RoleName=role):
            for policy_name in page.get("PolicyNames", []):
                ctx.delete("iam", "delete_role_policy", RoleName=role, PolicyName=policy_name)
        for page in ctx.aws.pages(
            "iam", "list_attached_role_policies", token="Marker", RoleName=role
        ):
            for attached in page.get("AttachedPolicies", []):
                ctx.delete(
                    "iam", "detach_role_policy", RoleName=role, PolicyArn=attached["PolicyArn"]
                )
        ctx.delete("iam", "delete_role", RoleName=role)


class InstanceProfile(Kind):
    key = "instance-profile"
    title = "Instance profile"

    def label(self, ctx: Ctx) -> str:
        return ctx.config.resource_name("instance")

    def find(self, ctx: Ctx) -> list[Found]:
        got = ctx.call(
            "iam",
            "get_instance_profile",
            InstanceProfileName=self.label(ctx),
            ignore=("NoSuchEntity",),
        )
        if got is None:
            return []
        profile = got["InstanceProfile"]
        if not is_owned(from_tag_list(profile.get("Tags")), ctx.name):
            return self.clash(ctx, f"IAM instance profile {profile['InstanceProfileName']}")
        return [self._found(profile)]

    @staticmethod
    def _found(profile: dict[str, Any]) -> Found:
        name = profile["InstanceProfileName"]
        return Found(id=name, name=name, arn=profile["Arn"], data=profile)

    def check(self, ctx: Ctx, found: Found) -> list[Drift]:
        roles = [r["RoleName"] for r in found.data.get("Roles", [])]
        if roles != [ctx.config.resource_name("instance")]:
            return [Drift(Action.UPDATE, f"holds roles {roles or 'none'}, not the instance role")]
        return []

    def create(self, ctx: Ctx) -> Found:
        name = self.label(ctx)
        ctx.call(
            "iam",
            "create_instance_profile",
            Path=ROLE_PATH,
            InstanceProfileName=name,
            Tags=as_tag_list(ctx.tags(self.key)),
        )
        return self._attach_and_wait(ctx, name, [])

    def update(self, ctx: Ctx, found: Found, drift: list[Drift]) -> Found:
        return self._attach_and_wait(ctx, found.id, found.data.get("Roles", []))

    def _attach_and_wait(self, ctx: Ctx, name: str, roles: list[dict[str, Any]]) -> Found:
        role = ctx.config.resource_name("instance")
        for other in roles:
            if other["RoleName"] != role:
                ctx.call(
                    "iam",
                    "remove_role_from_instance_profile",
                    InstanceProfileName=name,
                    RoleName=other["RoleName"],
                )
        if role not in [r["RoleName"] for r in roles]:
            # Both the profile and the role may not be visible to IAM yet.
            ctx.retry_codes(
                lambda: ctx.call(
                    "iam", "add_role_to_instance_profile", InstanceProfileName=name, RoleName=role
                ),
                codes=("NoSuchEntity",),
                what=f"instance profile {name} to become visible",
                wait=WAIT_PROFILE,
            )

        def propagated() -> dict[str, Any] | None:
            got = ctx.call(
                "iam", "get_instance_profile", InstanceProfileName=name, ignore=("NoSuchEntity",)
            )
            if got and [r["RoleName"] for r in got["InstanceProfile"].get("Roles", [])] == [role]:
                return got["InstanceProfile"]
            return None

        ctx.say(f"  waiting for instance profile {name} to propagate")
        profile = ctx.aws.wait_for(
            propagated,
            what=f"instance profile {name} to propagate",
            timeout=WAIT_PROFILE[0],
            interval=WAIT_PROFILE[1],
        )
        return self._found(profile)

    def delete(self, ctx: Ctx, found: Found) -> None:
        for role in found.data.get("Roles", []):
            ctx.delete(
                "iam",
                "remove_role_from_instance_profile",
                InstanceProfileName=found.id,
                RoleName=role["RoleName"],
            )
        ctx.delete("iam", "delete_instance_profile", InstanceProfileName=found.id)
