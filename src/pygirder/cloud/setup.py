"""Account-level AWS resources for pygirder: plan, setup, status, teardown.

Every resource kind is a small class with the same verbs: ``find`` it by tag,
``check`` it against the config (drift), ``create``, ``update``, ``delete``, and its
idle ``monthly_usd``.  The kinds are listed once, in dependency order, by
:func:`account_kinds`; :func:`plan`, :func:`setup`, :func:`status` and
:func:`teardown` walk that list and return a :class:`Report` that the CLI renders.

Rules every kind follows:

* **Discovered by tag, every run.**  Nothing is remembered locally (the cluster's
  private key file aside).  A resource is pygirder's only if it carries
  ``pygirder:managed=true`` and ``pygirder:name=<name>``; something else holding one
  of pygirder's names is a *conflict*: setup stops before creating anything, and
  nothing pygirder did not create is ever adopted, changed or deleted.
* **Converge.**  Setup creates what is missing, fixes what drifted, and does nothing
  when everything is as configured.  More than one of a singular resource is
  reported as a leak, not silently picked from.
* **Tagged at birth.**  Resources are tagged in the call that creates them; the one
  exception (S3 buckets are tagged right after creation) is rolled back if tagging
  fails.
* **Bounded waits.**  AWS is eventually consistent: waits for instance-profile
  propagation, NAT readiness and deletions poll with a limit, and teardown retries
  ``DependencyViolation`` with backoff.
"""

from __future__ import annotations

import enum
import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .aws import AccessDeniedError, Aws, CloudError, CredentialsError
from .config import CloudConfig, CloudConfigError
from .policy import (
    BOUNDARY_NAME,
    BOUNDARY_PATH,
    ROLE_PATH,
    boundary_arn,
    boundary_policy,
    instance_role_policy,
    instance_trust_policy,
    partition,
)
from .tags import (
    MANAGED_VALUE,
    TAG_COMPONENT,
    TAG_FLEET,
    TAG_MANAGED,
    TAG_NAME,
    TAG_ROLE,
    as_tag_list,
    ec2_filters,
    from_tag_list,
    is_owned,
    ownership_tags,
)

Progress = Callable[[str], None]

# Billing metrics (EstimatedCharges) exist only in us-east-1, and an alarm can notify
# only a topic in its own region, so the billing topic and alarms live there.
BILLING_REGION = "us-east-1"
INLINE_POLICY_NAME = "pygirder-instance"
LIFECYCLE_RULE_ID = "pygirder-expire-old-artifacts"

# Bounded waits: (timeout in seconds, poll interval in seconds).
WAIT_PROFILE = (90.0, 3.0)
WAIT_INSTANCE = (600.0, 5.0)
WAIT_NAT_GATEWAY = (900.0, 10.0)
WAIT_QUEUE_NAME = (75.0, 5.0)
# DependencyViolation during teardown: attempts and backoff (2, 4, 8, 16, 30, 30 ...).
DEPENDENCY_ATTEMPTS = 10
DEPENDENCY_BASE_DELAY = 2.0
DEPENDENCY_MAX_DELAY = 30.0
RETRY_ON_DELETE = frozenset(
    {
        "DependencyViolation",
        "DeleteConflict",
        "InvalidIPAddress.InUse",
        "ResourceInUse",
        "InvalidNetworkInterface.InUse",
        "IncorrectState",
    }
)

# Idle cost, us-east-1 on-demand list prices in USD (other regions differ by a few
# per cent).  A month is 730 hours.
HOURS_PER_MONTH = 730
PRICE_NAT_GATEWAY_HOUR = 0.045
PRICE_PUBLIC_IPV4_HOUR = 0.005
PRICE_EBS_GB_MONTH = {"gp3": 0.08, "gp2": 0.10, "standard": 0.05}
PRICE_SNAPSHOT_GB_MONTH = 0.05
PRICE_S3_GB_MONTH = 0.023
PRICE_ALARM_MONTH = 0.10
PRICE_INSTANCE_HOUR = {
    "t4g.nano": 0.0042,
    "t4g.micro": 0.0084,
    "t4g.small": 0.0168,
    "t3.nano": 0.0052,
    "t3.micro": 0.0104,
    "t3.small": 0.0208,
    "t3a.nano": 0.0047,
    "t3a.micro": 0.0094,
}
# Listing a huge bucket to price it is not worth it: stop counting after this many.
S3_COUNT_LIMIT = 100_000


# ------------------------------------------------------------------ the errors


class ResourceConflictError(CloudError):
    """Names pygirder needs are held by resources it did not create (or duplicated).

    ``items`` are the conflicting plan rows.  pygirder never adopts or deletes them.
    """

    def __init__(self, message: str, *, items: list[Item]) -> None:
        super().__init__(message, code="Conflict")
        self.items = items


class FleetAliveError(CloudError):
    """Teardown refused: fleet instances are still alive (``instance_ids``)."""

    def __init__(self, message: str, *, instance_ids: list[str]) -> None:
        super().__init__(message, code="FleetAlive")
        self.instance_ids = instance_ids


class NotSetUpError(CloudError):
    """The account is not (completely) set up: ``missing`` names what is absent."""

    def __init__(self, message: str, *, missing: list[str]) -> None:
        super().__init__(message, code="NotSetUp")
        self.missing = missing


# ---------------------------------------------------------------- the results


class Action(enum.StrEnum):
    """What plan/setup/teardown do (or did) to one resource."""

    CREATE = "create"  # missing: setup creates it
    UPDATE = "update"  # exists but differs from the config: setup fixes it in place
    REPLACE = "replace"  # exists but cannot be fixed in place: setup deletes and re-creates
    NONE = "ok"  # exists as configured: nothing to do
    DELETE = "delete"  # exists but is no longer wanted (or teardown): it is deleted
    CONFLICT = "conflict"  # blocked: a name clash, duplicates, or a change needing teardown
    FAILED = "failed"  # the operation failed (teardown continues with the rest)


@dataclass
class Item:
    """One row of a report: a resource (or a missing one) and what happens to it."""

    key: str  # the kind, e.g. "vpc", "billing-alarm-10"
    title: str  # for people, e.g. "VPC"
    name: str  # pygirder's name for it
    action: Action | None = None
    id: str = ""  # AWS id or ARN, once it exists
    state: str = ""  # "available", "running", "stopped", "missing", ...
    monthly_usd: float | None = None  # idle cost while it exists in this state
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["action"] = self.action.value if self.action else None
        return data


@dataclass
class Report:
    """What a command found or did; ``remaining`` lists tagged leftovers (teardown)."""

    command: str
    items: list[Item] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    remaining: list[str] = field(default_factory=list)

    @property
    def changes(self) -> list[Item]:
        return [i for i in self.items if i.action not in (None, Action.NONE)]

    @property
    def conflicts(self) -> list[Item]:
        return [i for i in self.items if i.action is Action.CONFLICT]

    @property
    def failures(self) -> list[Item]:
        return [i for i in self.items if i.action is Action.FAILED]

    @property
    def total_monthly_usd(self) -> float:
        return round(sum(i.monthly_usd or 0.0 for i in self.items), 2)

    @property
    def ok(self) -> bool:
        return not self.conflicts and not self.failures and not self.remaining

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "items": [i.to_dict() for i in self.items],
            "warnings": list(self.warnings),
            "remaining": list(self.remaining),
            "total_monthly_usd": self.total_monthly_usd,
            "ok": self.ok,
        }


@dataclass
class Found:
    """A resource pygirder created, as discovered now."""

    id: str
    name: str = ""
    state: str = "available"
    arn: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Drift:
    """One difference between a resource and the config, and how setup fixes it."""

    action: Action  # UPDATE, REPLACE or CONFLICT (needs teardown, or a person)
    text: str


# ------------------------------------------------------------------ the context


class Ctx:
    """What one command run shares: config, AWS adaptor, and what was found so far."""

    def __init__(self, config: CloudConfig, aws: Aws, progress: Progress | None = None):
        self.config = config
        self.aws = aws
        self.progress = progress
        self.found: dict[str, list[Found]] = {}
        self.clashes: dict[str, str] = {}
        self.public_key: str | None = None
        self.failed = False  # teardown: after one failure, stop waiting on dependencies

    # names ------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.config.name

    @property
    def region(self) -> str:
        return self.config.region

    @property
    def account_id(self) -> str:
        return self.aws.account_id

    @property
    def partition(self) -> str:
        return partition(self.region)

    @property
    def bucket(self) -> str:
        return self.config.bucket_name(self.account_id)

    def arn(self, service: str, resource: str, *, region: str | None = None) -> str:
        region = self.region if region is None else region
        return f"arn:{self.partition}:{service}:{region}:{self.account_id}:{resource}"

    @property
    def status_topic_arn(self) -> str:
        return self.arn("sns", self.config.resource_name("status"))

    @property
    def status_queue_arn(self) -> str:
        return self.arn("sqs", self.config.resource_name("status"))

    @property
    def billing_topic_arn(self) -> str:
        return self.arn("sns", self.config.resource_name("billing"), region=BILLING_REGION)

    # tags -------------------------------------------------------------------
    def tags(self, component: str | None = None) -> dict[str, str]:
        """User tags plus pygirder's ownership tags (ours win)."""
        return {**self.config.tags, **ownership_tags(self.name, component)}

    def tag_specs(
        self, component: str, *resource_types: str, name: str | None = None
    ) -> list[dict[str, Any]]:
        """EC2 ``TagSpecifications``; ``name`` adds the ``Name`` tag the console shows."""
        tags = self.tags(component)
        if name:
            tags = {"Name": name, **tags}
        return [{"ResourceType": rt, "Tags": as_tag_list(tags)} for rt in resource_types]

    # calls ------------------------------------------------------------------
    def call(self, service: str, operation: str, **params: Any) -> Any:
        return self.aws.call(service, operation, **params)

    def ec2(self, operation: str, **params: Any) -> Any:
        return self.aws.call("ec2", operation, **params)

    def describe(self, operation: str, key: str, **params: Any) -> list[dict[str, Any]]:
        """All items of a paginated EC2 describe call."""
        out: list[dict[str, Any]] = []
        for page in self.aws.pages("ec2", operation, **params):
            out.extend(page.get(key, []))
        return out

    def delete(self, service: str, operation: str, *, region: str | None = None, **params):
        """A delete call that treats "already gone" as success and retries while
        AWS still sees dependents (``DependencyViolation``) with backoff."""
        attempt = 1
        while True:
            try:
                return self.aws.call(service, operation, region=region, **params)
            except CloudError as exc:
                if is_not_found(exc.code):
                    return None
                if (
                    exc.code in RETRY_ON_DELETE
                    and attempt < DEPENDENCY_ATTEMPTS
                    and not self.failed
                ):
                    delay = min(DEPENDENCY_MAX_DELAY, DEPENDENCY_BASE_DELAY * 2 ** (attempt - 1))
                    self.say(
                        f"  {service}:{exc.operation}: {exc.code}, retrying in {delay:.0f}s "
                        f"(attempt {attempt + 1}/{DEPENDENCY_ATTEMPTS})"
                    )
                    self.aws.sleep(delay)
                    attempt += 1
                    continue
                raise

    def retry_codes(
        self, fn: Callable[[], Any], *, codes: Iterable[str], what: str, wait: tuple[float, float]
    ) -> Any:
        """Run ``fn``, retrying while it fails with one of ``codes`` (eventual
        consistency), up to the ``wait`` bound."""
        codes = frozenset(codes)
        box: dict[str, Any] = {}

        def attempt() -> bool:
            try:
                box["result"] = fn()
                return True
            except CloudError as exc:
                if exc.code in codes:
                    return False
                raise

        self.aws.wait_for(attempt, what=what, timeout=wait[0], interval=wait[1])
        return box.get("result")

    def say(self, text: str) -> None:
        if self.progress:
            self.progress(text)

    # what was found ---------------------------------------------------------
    def get(self, key: str) -> Found | None:
        found = self.found.get(key) or []
        return found[0] if found else None

    def require(self, key: str) -> Found:
        found = self.get(key)
        if found is None:  # a bug in the kind order, or a failed earlier step
            raise NotSetUpError(f"{key} must exist first", missing=[key])
        return found


def is_not_found(code: str) -> bool:
    """Error codes that mean "that resource does not exist (any more)"."""
    return (
        "NotFound" in code
        or code.endswith(".Unavailable")
        or code
        in {
            "NoSuchEntity",
            "NoSuchBucket",
            "404",
            "NotFound",
            "NotFoundException",
            "ParameterNotFound",
            "AWS.SimpleQueueService.NonExistentQueue",
            "QueueDoesNotExist",
            "Gateway.NotAttached",
        }
    )


# ------------------------------------------------------------- the kind protocol


class Kind:
    """One kind of resource.  Subclasses fill in the verbs they need."""

    key = ""
    title = ""
    region: str | None = None  # None: the config's region
    shared = False  # one per account for every setup: teardown leaves it

    def wanted(self, config: CloudConfig) -> bool:
        """Does setup want this resource with this config?"""
        return True

    def label(self, ctx: Ctx) -> str:
        return ctx.config.resource_name(self.key)

    def find(self, ctx: Ctx) -> list[Found]:
        raise NotImplementedError

    def check(self, ctx: Ctx, found: Found) -> list[Drift]:
        return []

    def create(self, ctx: Ctx) -> Found:
        raise NotImplementedError

    def update(self, ctx: Ctx, found: Found, drift: list[Drift]) -> Found:
        return found

    def delete(self, ctx: Ctx, found: Found) -> None:
        raise NotImplementedError

    def monthly_usd(self, ctx: Ctx, found: Found) -> float | None:
        return 0.0

    def describe(self, ctx: Ctx, found: Found) -> str:
        return ""

    def clash(self, ctx: Ctx, what: str) -> list[Found]:
        """Record that a resource pygirder did not create holds our name."""
        ctx.clashes[self.key] = (
            f"{what} exists but was not created by pygirder for [cloud] name "
            f"{ctx.name!r} (it lacks the tags {TAG_MANAGED}=true, {TAG_NAME}={ctx.name}); "
            "pygirder never adopts or deletes it. Choose another [cloud] name, or remove "
            "or rename that resource yourself."
        )
        return []


class Ec2Kind(Kind):
    """An EC2 resource found with ``describe_*`` and tag filters."""

    describe_op = ""
    result_key = ""
    id_key = ""
    gone_states: frozenset[str] = frozenset()

    def find(self, ctx: Ctx) -> list[Found]:
        items = ctx.describe(
            self.describe_op, self.result_key, Filters=ec2_filters(ctx.name, self.key)
        )
        out = []
        for item in items:
            state = self.state_of(item)
            if state in self.gone_states:
                continue
            out.append(Found(id=item[self.id_key], name=self.label(ctx), state=state, data=item))
        return out

    def state_of(self, item: dict[str, Any]) -> str:
        return str(item.get("State", "available"))


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
        if _same_json(_as_json(version.get("Document")), boundary_policy(ctx.partition)):
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
        trust = _as_json(found.data.get("AssumeRolePolicyDocument"))
        if not _same_json(trust, instance_trust_policy()):
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
        elif not _same_json(_as_json(got["PolicyDocument"]), self.policy(ctx)):
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


# ------------------------------------------------------------------------- S3


class Bucket(Kind):
    key = "bucket"
    title = "Artifact bucket"

    def label(self, ctx: Ctx) -> str:
        return ctx.bucket

    def find(self, ctx: Ctx) -> list[Found]:
        name = ctx.bucket
        try:
            head = ctx.call("s3", "head_bucket", Bucket=name, ignore=("404", "NoSuchBucket"))
        except AccessDeniedError:
            ctx.clashes[self.key] = (
                f"S3 bucket {name} exists in another AWS account (or your identity may not "
                "list it). Bucket names are global: set [cloud] bucket to another name."
            )
            return []
        except CloudError as exc:
            if exc.code == "301":
                ctx.clashes[self.key] = (
                    f"S3 bucket {name} exists in another region; set [cloud] bucket to "
                    "another name or region to match it."
                )
                return []
            raise
        if head is None:
            return []
        got = ctx.call("s3", "get_bucket_tagging", Bucket=name, ignore=("NoSuchTagSet",))
        tags = from_tag_list(got.get("TagSet") if got else None)
        if not is_owned(tags, ctx.name):
            return self.clash(ctx, f"S3 bucket {name}")
        return [Found(id=name, name=name, arn=f"arn:{ctx.partition}:s3:::{name}")]

    def _lifecycle(self, ctx: Ctx) -> dict[str, Any]:
        return {
            "ID": LIFECYCLE_RULE_ID,
            "Status": "Enabled",
            "Filter": {"Prefix": ctx.config.artifact_prefix},
            "Expiration": {"Days": ctx.config.artifact_retention_days},
            "NoncurrentVersionExpiration": {"NoncurrentDays": 1},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
        }

    def check(self, ctx: Ctx, found: Found) -> list[Drift]:
        name = found.id
        drift = []
        block = ctx.call(
            "s3",
            "get_public_access_block",
            Bucket=name,
            ignore=("NoSuchPublicAccessBlockConfiguration",),
        )
        settings = (block or {}).get("PublicAccessBlockConfiguration", {})
        if not all(settings.get(k) for k in _PUBLIC_ACCESS_BLOCK):
            drift.append(Drift(Action.UPDATE, "public access not fully blocked"))
        enc = ctx.call(
            "s3",
            "get_bucket_encryption",
            Bucket=name,
            ignore=("ServerSideEncryptionConfigurationNotFoundError",),
        )
        if not (enc or {}).get("ServerSideEncryptionConfiguration", {}).get("Rules"):
            drift.append(Drift(Action.UPDATE, "default encryption missing"))
        lc = ctx.call(
            "s3",
            "get_bucket_lifecycle_configuration",
            Bucket=name,
            ignore=("NoSuchLifecycleConfiguration",),
        )
        rules = {r.get("ID"): r for r in (lc or {}).get("Rules", [])}
        rule = rules.get(LIFECYCLE_RULE_ID)
        want = self._lifecycle(ctx)
        if (
            rule is None
            or rule.get("Expiration") != want["Expiration"]
            or rule.get("Filter", {}).get("Prefix") != ctx.config.artifact_prefix
        ):
            drift.append(Drift(Action.UPDATE, "artifact lifecycle rule missing or different"))
        return drift

    def create(self, ctx: Ctx) -> Found:
        name = ctx.bucket
        params: dict[str, Any] = {"Bucket": name, "ObjectOwnership": "BucketOwnerEnforced"}
        if ctx.region != "us-east-1":
            params["CreateBucketConfiguration"] = {"LocationConstraint": ctx.region}
        try:
            ctx.call("s3", "create_bucket", **params)
        except CloudError as exc:
            if exc.code == "BucketAlreadyExists":
                raise ResourceConflictError(
                    f"S3 bucket name {name} is taken by another AWS account; bucket names "
                    "are global: set [cloud] bucket to another name.",
                    items=[],
                ) from exc
            raise
        try:
            ctx.call(
                "s3",
                "put_bucket_tagging",
                Bucket=name,
                Tagging={"TagSet": as_tag_list(ctx.tags(self.key))},
            )
        except CloudError:
            # Untagged, the bucket would look foreign next time: remove it.
            ctx.delete("s3", "delete_bucket", Bucket=name)
            raise
        found = Found(id=name, name=name, arn=f"arn:{ctx.partition}:s3:::{name}")
        return self.update(ctx, found, [])

    def update(self, ctx: Ctx, found: Found, drift: list[Drift]) -> Found:
        name = found.id
        ctx.call(
            "s3",
            "put_public_access_block",
            Bucket=name,
            PublicAccessBlockConfiguration={k: True for k in _PUBLIC_ACCESS_BLOCK},
        )
        ctx.call(
            "s3",
            "put_bucket_encryption",
            Bucket=name,
            ServerSideEncryptionConfiguration={
                "Rules": [
                    {
                        "ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"},
                        "BucketKeyEnabled": True,
                    }
                ]
            },
        )
        lc = ctx.call(
            "s3",
            "get_bucket_lifecycle_configuration",
            Bucket=name,
            ignore=("NoSuchLifecycleConfiguration",),
        )
        others = [r for r in (lc or {}).get("Rules", []) if r.get("ID") != LIFECYCLE_RULE_ID]
        ctx.call(
            "s3",
            "put_bucket_lifecycle_configuration",
            Bucket=name,
            LifecycleConfiguration={"Rules": [*others, self._lifecycle(ctx)]},
        )
        return found

    def delete(self, ctx: Ctx, found: Found) -> None:
        name = found.id
        deleted = 0
        params: dict[str, Any] = {"Bucket": name}
        while True:
            page = ctx.call("s3", "list_object_versions", ignore=("NoSuchBucket",), **params)
            if page is None:
                return
            objects = [
                {"Key": v["Key"], "VersionId": v["VersionId"]}
                for v in page.get("Versions", []) + page.get("DeleteMarkers", [])
            ]
            for start in range(0, len(objects), 1000):
                ctx.call(
                    "s3",
                    "delete_objects",
                    Bucket=name,
                    Delete={"Objects": objects[start : start + 1000], "Quiet": True},
                )
            deleted += len(objects)
            if not page.get("IsTruncated"):
                break
            params = {
                "Bucket": name,
                "KeyMarker": page.get("NextKeyMarker"),
                "VersionIdMarker": page.get("NextVersionIdMarker"),
            }
        if deleted:
            ctx.say(f"  emptied bucket {name} ({deleted} object versions)")
        ctx.delete("s3", "delete_bucket", Bucket=name)

    def _size(self, ctx: Ctx, name: str) -> tuple[int, int, bool]:
        count = size = 0
        for page in ctx.aws.pages(
            "s3",
            "list_objects_v2",
            token="ContinuationToken",
            next_token="NextContinuationToken",
            Bucket=name,
        ):
            for obj in page.get("Contents", []):
                count += 1
                size += obj.get("Size", 0)
            if count >= S3_COUNT_LIMIT:
                return count, size, True
        return count, size, False

    def monthly_usd(self, ctx: Ctx, found: Found) -> float | None:
        _, size, _ = self._size(ctx, found.id)
        return size / 1e9 * PRICE_S3_GB_MONTH

    def describe(self, ctx: Ctx, found: Found) -> str:
        count, size, more = self._size(ctx, found.id)
        return f"{count}{'+' if more else ''} objects, {_human_bytes(size)}"


_PUBLIC_ACCESS_BLOCK = (
    "BlockPublicAcls",
    "IgnorePublicAcls",
    "BlockPublicPolicy",
    "RestrictPublicBuckets",
)


# ------------------------------------------------------------------- SNS / SQS


class Topic(Kind):
    """An SNS topic named ``pygirder-<name>-<suffix>``."""

    suffix = ""

    def label(self, ctx: Ctx) -> str:
        return ctx.config.resource_name(self.suffix)

    def topic_arn(self, ctx: Ctx) -> str:
        return ctx.arn("sns", self.label(ctx), region=self.region)

    def topic_policy(self, ctx: Ctx) -> dict[str, Any] | None:
        return None  # keep the default policy

    def find(self, ctx: Ctx) -> list[Found]:
        arn = self.topic_arn(ctx)
        got = ctx.call(
            "sns", "get_topic_attributes", region=self.region, TopicArn=arn, ignore=("NotFound",)
        )
        if got is None:
            return []
        tags = ctx.call("sns", "list_tags_for_resource", region=self.region, ResourceArn=arn)
        if not is_owned(from_tag_list(tags.get("Tags")), ctx.name):
            return self.clash(ctx, f"SNS topic {arn}")
        attrs = got["Attributes"]
        return [Found(id=arn, name=self.label(ctx), arn=arn, data=attrs)]

    def check(self, ctx: Ctx, found: Found) -> list[Drift]:
        want = self.topic_policy(ctx)
        if want is None:
            return []
        have = _as_json(found.data.get("Policy") or "{}")
        sids = {s.get("Sid") for s in have.get("Statement", [])}
        if not {s["Sid"] for s in want["Statement"]} <= sids:
            return [Drift(Action.UPDATE, "topic policy does not admit billing notifications")]
        return []

    def create(self, ctx: Ctx) -> Found:
        params: dict[str, Any] = {"Name": self.label(ctx), "Tags": as_tag_list(ctx.tags(self.key))}
        policy = self.topic_policy(ctx)
        if policy is not None:
            params["Attributes"] = {"Policy": json.dumps(policy)}
        arn = ctx.call("sns", "create_topic", region=self.region, **params)["TopicArn"]
        return Found(id=arn, name=self.label(ctx), arn=arn, data=params.get("Attributes", {}))

    def update(self, ctx: Ctx, found: Found, drift: list[Drift]) -> Found:
        policy = self.topic_policy(ctx)
        if policy is not None:
            ctx.call(
                "sns",
                "set_topic_attributes",
                region=self.region,
                TopicArn=found.id,
                AttributeName="Policy",
                AttributeValue=json.dumps(policy),
            )
        return found

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.delete("sns", "delete_topic", region=self.region, TopicArn=found.id)

    def describe(self, ctx: Ctx, found: Found) -> str:
        confirmed = found.data.get("SubscriptionsConfirmed")
        pending = found.data.get("SubscriptionsPending")
        if confirmed is None:
            return ""
        return f"{confirmed} subscriptions" + (f", {pending} pending" if pending != "0" else "")


class StatusTopic(Topic):
    key = "status-topic"
    title = "Status topic"
    suffix = "status"


class BillingTopic(Topic):
    key = "billing-topic"
    title = "Billing topic"
    suffix = "billing"
    region = BILLING_REGION

    def topic_policy(self, ctx: Ctx) -> dict[str, Any]:
        arn = self.topic_arn(ctx)
        account = {"StringEquals": {"aws:SourceAccount": ctx.account_id}}
        return {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "pygirder-account-owner",
                    "Effect": "Allow",
                    "Principal": {"AWS": f"arn:{ctx.partition}:iam::{ctx.account_id}:root"},
                    "Action": [
                        "SNS:Publish",
                        "SNS:Subscribe",
                        "SNS:GetTopicAttributes",
                        "SNS:SetTopicAttributes",
                        "SNS:ListSubscriptionsByTopic",
                        "SNS:DeleteTopic",
                    ],
                    "Resource": arn,
                },
                {
                    "Sid": "pygirder-cloudwatch-alarms",
                    "Effect": "Allow",
                    "Principal": {"Service": "cloudwatch.amazonaws.com"},
                    "Action": "SNS:Publish",
                    "Resource": arn,
                    "Condition": account,
                },
                {
                    "Sid": "pygirder-budgets",
                    "Effect": "Allow",
                    "Principal": {"Service": "budgets.amazonaws.com"},
                    "Action": "SNS:Publish",
                    "Resource": arn,
                    "Condition": account,
                },
            ],
        }


class StatusQueue(Kind):
    key = "status-queue"
    title = "Status queue"

    def label(self, ctx: Ctx) -> str:
        return ctx.config.resource_name("status")

    def attributes(self, ctx: Ctx) -> dict[str, str]:
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "pygirder-status-topic-only",
                    "Effect": "Allow",
                    "Principal": {"Service": "sns.amazonaws.com"},
                    "Action": "sqs:SendMessage",
                    "Resource": ctx.status_queue_arn,
                    "Condition": {"ArnEquals": {"aws:SourceArn": ctx.status_topic_arn}},
                }
            ],
        }
        return {
            "Policy": json.dumps(policy),
            "SqsManagedSseEnabled": "true",
            "MessageRetentionPeriod": "86400",  # announcements matter for a day at most
            "ReceiveMessageWaitTimeSeconds": "20",  # long polling
            "VisibilityTimeout": "30",
        }

    def find(self, ctx: Ctx) -> list[Found]:
        got = ctx.call(
            "sqs",
            "get_queue_url",
            QueueName=self.label(ctx),
            ignore=("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"),
        )
        if got is None:
            return []
        url = got["QueueUrl"]
        tags = ctx.call("sqs", "list_queue_tags", QueueUrl=url).get("Tags", {})
        if not is_owned(tags, ctx.name):
            return self.clash(ctx, f"SQS queue {url}")
        attrs = ctx.call("sqs", "get_queue_attributes", QueueUrl=url, AttributeNames=["All"])
        attrs = attrs.get("Attributes", {})
        return [Found(id=url, name=self.label(ctx), arn=attrs.get("QueueArn", ""), data=attrs)]

    def check(self, ctx: Ctx, found: Found) -> list[Drift]:
        drift = []
        for key, want in self.attributes(ctx).items():
            have = found.data.get(key)
            same = (
                _same_json(_as_json(have or "{}"), _as_json(want))
                if key == "Policy"
                else (have == want)
            )
            if not same:
                what = "policy (only the status topic may send)" if key == "Policy" else key
                drift.append(Drift(Action.UPDATE, f"{what} differs"))
        return drift

    def create(self, ctx: Ctx) -> Found:
        def create() -> dict[str, Any]:
            return ctx.call(
                "sqs",
                "create_queue",
                QueueName=self.label(ctx),
                Attributes=self.attributes(ctx),
                tags=ctx.tags(self.key),
            )

        # SQS refuses a name for 60 s after a queue of that name was deleted.
        got = ctx.retry_codes(
            create,
            codes=("AWS.SimpleQueueService.QueueDeletedRecently", "QueueDeletedRecently"),
            what="SQS to release the queue name after a recent teardown",
            wait=WAIT_QUEUE_NAME,
        )
        url = got["QueueUrl"]
        return Found(id=url, name=self.label(ctx), arn=ctx.status_queue_arn)

    def update(self, ctx: Ctx, found: Found, drift: list[Drift]) -> Found:
        ctx.call("sqs", "set_queue_attributes", QueueUrl=found.id, Attributes=self.attributes(ctx))
        return found

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.delete("sqs", "delete_queue", QueueUrl=found.id)

    def describe(self, ctx: Ctx, found: Found) -> str:
        waiting = found.data.get("ApproximateNumberOfMessages")
        return f"{waiting} messages waiting" if waiting is not None else ""


class StatusSubscription(Kind):
    """The status queue's subscription to the status topic (raw message delivery)."""

    key = "status-subscription"
    title = "Queue subscription"

    def label(self, ctx: Ctx) -> str:
        return f"{ctx.config.resource_name('status')} -> queue"

    def find(self, ctx: Ctx) -> list[Found]:
        topic = ctx.get("status-topic")
        if topic is None:
            return []
        out = []
        for page in ctx.aws.pages("sns", "list_subscriptions_by_topic", TopicArn=topic.id):
            for sub in page.get("Subscriptions", []):
                if sub.get("Protocol") == "sqs" and sub.get("Endpoint") == ctx.status_queue_arn:
                    arn = sub["SubscriptionArn"]
                    out.append(Found(id=arn, name=self.label(ctx), arn=arn, data=sub))
        return out

    def check(self, ctx: Ctx, found: Found) -> list[Drift]:
        attrs = ctx.call("sns", "get_subscription_attributes", SubscriptionArn=found.id)
        if attrs.get("Attributes", {}).get("RawMessageDelivery") != "true":
            return [Drift(Action.UPDATE, "raw message delivery is off")]
        return []

    def create(self, ctx: Ctx) -> Found:
        arn = ctx.call(
            "sns",
            "subscribe",
            TopicArn=ctx.require("status-topic").id,
            Protocol="sqs",
            Endpoint=ctx.status_queue_arn,
            Attributes={"RawMessageDelivery": "true"},
            ReturnSubscriptionArn=True,
        )["SubscriptionArn"]
        return Found(id=arn, name=self.label(ctx), arn=arn)

    def update(self, ctx: Ctx, found: Found, drift: list[Drift]) -> Found:
        ctx.call(
            "sns",
            "set_subscription_attributes",
            SubscriptionArn=found.id,
            AttributeName="RawMessageDelivery",
            AttributeValue="true",
        )
        return found

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.delete("sns", "unsubscribe", SubscriptionArn=found.id)


# ------------------------------------------------------------------- key pairs


class KeyPair(Kind):
    """An EC2 key pair named ``pygirder-<name>-<key>`` (key names are unique)."""

    def find(self, ctx: Ctx) -> list[Found]:
        got = ctx.call(
            "ec2",
            "describe_key_pairs",
            KeyNames=[self.label(ctx)],
            IncludePublicKey=True,
            ignore=("InvalidKeyPair.NotFound",),
        )
        pairs = (got or {}).get("KeyPairs", [])
        if not pairs:
            return []
        pair = pairs[0]
        if not is_owned(from_tag_list(pair.get("Tags")), ctx.name):
            return self.clash(ctx, f"EC2 key pair {pair['KeyName']}")
        return [Found(id=pair["KeyPairId"], name=pair["KeyName"], data=pair)]

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.delete("ec2", "delete_key_pair", KeyName=found.name)


class UserKey(KeyPair):
    key = "user-key"
    title = "Your key pair"

    def label(self, ctx: Ctx) -> str:
        return ctx.config.resource_name("user")

    def check(self, ctx: Ctx, found: Found) -> list[Drift]:
        local = ctx.public_key or _try_public_key(ctx.config)
        remote = found.data.get("PublicKey")
        if local and remote and _key_body(local) != _key_body(remote):
            return [Drift(Action.REPLACE, f"differs from {ctx.config.public_key_path}")]
        return []

    def create(self, ctx: Ctx) -> Found:
        material = ctx.public_key or read_public_key(ctx.config)
        pair = ctx.call(
            "ec2",
            "import_key_pair",
            KeyName=self.label(ctx),
            PublicKeyMaterial=material.encode(),
            TagSpecifications=ctx.tag_specs(self.key, "key-pair"),
        )
        return Found(id=pair["KeyPairId"], name=pair["KeyName"], data=pair)

    def describe(self, ctx: Ctx, found: Found) -> str:
        return f"from {ctx.config.public_key_path}"


class ClusterKey(KeyPair):
    key = "cluster-key"
    title = "Cluster key pair"

    def label(self, ctx: Ctx) -> str:
        return ctx.config.resource_name("cluster")

    def check(self, ctx: Ctx, found: Found) -> list[Drift]:
        path = ctx.config.cluster_key_path
        if not path.is_file():
            return [Drift(Action.REPLACE, f"private key {path} is missing locally")]
        return []

    def create(self, ctx: Ctx) -> Found:
        pair = ctx.call(
            "ec2",
            "create_key_pair",
            KeyName=self.label(ctx),
            KeyType="ed25519",
            KeyFormat="pem",
            TagSpecifications=ctx.tag_specs(self.key, "key-pair"),
        )
        try:
            write_private_key(ctx.config.cluster_key_path, pair["KeyMaterial"])
        except OSError as exc:
            ctx.delete("ec2", "delete_key_pair", KeyPairId=pair["KeyPairId"])
            raise CloudConfigError(
                f"cannot write the cluster key to {ctx.config.cluster_key_path}: {exc}; "
                "set [cloud] cluster_key_file to a writable path",
                problems=[("cluster_key_file", str(ctx.config.cluster_key_path), str(exc))],
            ) from exc
        ctx.say(f"  saved the cluster private key to {ctx.config.cluster_key_path} (mode 0600)")
        data = {k: v for k, v in pair.items() if k != "KeyMaterial"}
        return Found(id=pair["KeyPairId"], name=pair["KeyName"], data=data)

    def delete(self, ctx: Ctx, found: Found) -> None:
        super().delete(ctx, found)
        path = ctx.config.cluster_key_path
        if path.is_file():
            path.unlink()
            ctx.say(f"  removed {path}")

    def describe(self, ctx: Ctx, found: Found) -> str:
        path = ctx.config.cluster_key_path
        return f"private key {path}" if path.is_file() else f"private key {path} MISSING"


def write_private_key(path: Path, material: str) -> None:
    """Write a private key atomically, readable by its owner only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".pygirder-key-", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(material if material.endswith("\n") else material + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_PUBLIC_KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp", "sk-ssh-ed25519", "sk-ecdsa")


def ensure_key_pair(config: CloudConfig) -> Path | None:
    """Create pygirder's own SSH key pair when the config relies on it and it is missing.

    Returns the private key's path when it was created now, else None.  The key is
    ed25519, made with the ``cryptography`` package (``ssh-keygen`` when that is not
    installed); the private half is written with mode 0600 in a 0700 folder, and
    never overwritten.
    """
    if not config.uses_pygirder_key:
        return None
    private = config.pygirder_key_path
    public = config.public_key_path
    if public.exists():
        return None
    private.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if private.exists():
        raise CloudConfigError(
            f"{private} exists but its public half {public} does not: recreate it with "
            f"`ssh-keygen -y -f {private} > {public}`, or set [cloud] public_key_file",
            problems=[("public_key_file", str(config.public_key_file), "a public key file")],
        )
    comment = f"pygirder@{os.uname().nodename}"
    try:
        private_text, public_text = _new_ed25519_key(comment)
    except ImportError:
        if not shutil.which("ssh-keygen"):
            raise CloudConfigError(
                "no SSH key: ~/.ssh/id_ed25519.pub does not exist and pygirder cannot "
                "create one (install the `cryptography` package, or ssh-keygen); or set "
                "[cloud] public_key_file to your .pub file",
                problems=[("public_key_file", str(config.public_key_file), "a public key")],
            ) from None
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(private)],
            check=True, stdin=subprocess.DEVNULL, capture_output=True,
        )  # fmt: skip
        os.chmod(private, 0o600)
        return private
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(private_text)
    public.write_text(public_text)
    return private


def _new_ed25519_key(comment: str) -> tuple[str, str]:
    """(OpenSSH private key, public key line) of a new ed25519 key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, f"{public.decode()} {comment}\n"


def read_public_key(config: CloudConfig) -> str:
    """The user's OpenSSH public key, or an error that says how to make one."""
    path = config.public_key_path
    problem = [("public_key_file", str(config.public_key_file), "an OpenSSH public key file")]
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        if config.uses_pygirder_key:
            raise CloudConfigError(
                f"no SSH key yet: {config.public_key_file} does not exist, so `pygirder "
                f"cloud setup` will create a pygirder key pair at {config.pygirder_key_path} "
                "(or set [cloud] public_key_file to your own .pub file)",
                problems=problem,
            ) from None
        raise CloudConfigError(
            f"[cloud] public_key_file {path} does not exist; create a key with "
            f"`ssh-keygen -t ed25519` or point public_key_file at your .pub file",
            problems=problem,
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CloudConfigError(
            f"cannot read [cloud] public_key_file {path}: {exc}", problems=problem
        ) from None
    if "PRIVATE KEY" in text:
        raise CloudConfigError(
            f"[cloud] public_key_file {path} is a PRIVATE key; point it at the matching "
            ".pub file (pygirder never uploads private keys)",
            problems=problem,
        )
    first = text.splitlines()[0] if text else ""
    if not first.startswith(_PUBLIC_KEY_TYPES) or len(first.split()) < 2:
        raise CloudConfigError(
            f"[cloud] public_key_file {path} is not an OpenSSH public key (expected a "
            "line starting with ssh-ed25519, ssh-rsa or ecdsa-sha2-...)",
            problems=problem,
        )
    return first


def _try_public_key(config: CloudConfig) -> str | None:
    try:
        return read_public_key(config)
    except CloudConfigError:
        return None


def _key_body(line: str) -> tuple[str, ...]:
    return tuple(line.split()[:2])  # type and base64 key; the comment does not count


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
        terminate_instances(ctx, [found.id])

    def monthly_usd(self, ctx: Ctx, found: Found) -> float | None:
        return instance_monthly_usd(ctx, found.data)

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


# --------------------------------------------------------------------- billing


def _amount(value: float) -> str:
    return f"{value:g}"


class BillingEmail(Kind):
    """The alert e-mail address subscribed to the billing topic."""

    key = "billing-email"
    title = "Billing e-mail"
    region = BILLING_REGION

    def wanted(self, config: CloudConfig) -> bool:
        return config.alert_email is not None

    def label(self, ctx: Ctx) -> str:
        return ctx.config.alert_email or "(no alert_email)"

    def find(self, ctx: Ctx) -> list[Found]:
        topic = ctx.get("billing-topic")
        email = ctx.config.alert_email
        if topic is None or email is None:
            return []
        out = []
        for page in ctx.aws.pages(
            "sns", "list_subscriptions_by_topic", region=self.region, TopicArn=topic.id
        ):
            for sub in page.get("Subscriptions", []):
                if sub.get("Protocol") == "email" and sub.get("Endpoint") == email:
                    arn = sub["SubscriptionArn"]
                    state = "pending confirmation" if arn == "PendingConfirmation" else "confirmed"
                    out.append(Found(id=arn, name=email, state=state, data=sub))
        return out[:1]

    def create(self, ctx: Ctx) -> Found:
        arn = ctx.call(
            "sns",
            "subscribe",
            region=self.region,
            TopicArn=ctx.require("billing-topic").id,
            Protocol="email",
            Endpoint=ctx.config.alert_email,
            ReturnSubscriptionArn=True,
        )["SubscriptionArn"]
        ctx.say(f"  AWS sent a confirmation e-mail to {ctx.config.alert_email}: click its link")
        return Found(id=arn, name=self.label(ctx), state="pending confirmation")

    def describe(self, ctx: Ctx, found: Found) -> str:
        if found.state == "pending confirmation":
            return "pending: click the link in the e-mail from AWS"
        return ""

    def delete(self, ctx: Ctx, found: Found) -> None:
        if found.id.startswith("arn:"):  # a pending subscription cannot be removed
            ctx.delete("sns", "unsubscribe", region=self.region, SubscriptionArn=found.id)


class BillingAlarm(Kind):
    """A CloudWatch alarm on the account's estimated charges at one threshold."""

    title = "Billing alarm"
    region = BILLING_REGION

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.key = f"billing-alarm-{_amount(threshold)}"

    def label(self, ctx: Ctx) -> str:
        return alarm_name(ctx.config, self.threshold)

    def find(self, ctx: Ctx) -> list[Found]:
        got = ctx.call(
            "cloudwatch", "describe_alarms", region=self.region, AlarmNames=[self.label(ctx)]
        )
        out = []
        for alarm in got.get("MetricAlarms", []):
            if not _alarm_owned(ctx, alarm):
                return self.clash(ctx, f"CloudWatch alarm {alarm['AlarmName']}")
            out.append(_alarm_found(alarm))
        return out

    def params(self, ctx: Ctx) -> dict[str, Any]:
        return {
            "AlarmName": self.label(ctx),
            "AlarmDescription": (
                f"pygirder {ctx.name}: estimated AWS charges this month reached "
                f"{_amount(self.threshold)} USD"
            ),
            "ActionsEnabled": True,
            "AlarmActions": [ctx.billing_topic_arn],
            "Namespace": "AWS/Billing",
            "MetricName": "EstimatedCharges",
            "Dimensions": [{"Name": "Currency", "Value": "USD"}],
            "Statistic": "Maximum",
            "Period": 21600,  # billing data arrives a few times a day
            "EvaluationPeriods": 1,
            "Threshold": float(self.threshold),
            "ComparisonOperator": "GreaterThanOrEqualToThreshold",
            "TreatMissingData": "notBreaching",
        }

    def check(self, ctx: Ctx, found: Found) -> list[Drift]:
        want = self.params(ctx)
        have = found.data
        if (
            float(have.get("Threshold", -1)) != want["Threshold"]
            or have.get("AlarmActions") != want["AlarmActions"]
            or have.get("MetricName") != want["MetricName"]
            or have.get("ComparisonOperator") != want["ComparisonOperator"]
        ):
            return [Drift(Action.UPDATE, "threshold, metric or notification differs")]
        return []

    def create(self, ctx: Ctx) -> Found:
        ctx.call(
            "cloudwatch",
            "put_metric_alarm",
            region=self.region,
            Tags=as_tag_list(ctx.tags("billing-alarm")),
            **self.params(ctx),
        )
        arn = ctx.arn("cloudwatch", f"alarm:{self.label(ctx)}", region=self.region)
        return Found(id=self.label(ctx), name=self.label(ctx), arn=arn, state="INSUFFICIENT_DATA")

    def update(self, ctx: Ctx, found: Found, drift: list[Drift]) -> Found:
        ctx.call("cloudwatch", "put_metric_alarm", region=self.region, **self.params(ctx))
        return found

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.delete("cloudwatch", "delete_alarms", region=self.region, AlarmNames=[found.id])

    def monthly_usd(self, ctx: Ctx, found: Found) -> float | None:
        return PRICE_ALARM_MONTH

    def describe(self, ctx: Ctx, found: Found) -> str:
        return f">= {_amount(self.threshold)} USD"


class OldBillingAlarms(Kind):
    """pygirder's billing alarms at thresholds no longer in the config."""

    key = "old-billing-alarms"
    title = "Old billing alarm"
    region = BILLING_REGION

    def wanted(self, config: CloudConfig) -> bool:
        return False

    def find(self, ctx: Ctx) -> list[Found]:
        prefix = ctx.config.resource_name("billing-")
        keep = {alarm_name(ctx.config, t) for t in ctx.config.alarm_thresholds_usd}
        out = []
        for page in ctx.aws.pages(
            "cloudwatch", "describe_alarms", region=self.region, AlarmNamePrefix=prefix
        ):
            for alarm in page.get("MetricAlarms", []):
                if alarm["AlarmName"] not in keep and _alarm_owned(ctx, alarm):
                    out.append(_alarm_found(alarm))
        return out

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.delete("cloudwatch", "delete_alarms", region=self.region, AlarmNames=[found.id])

    def monthly_usd(self, ctx: Ctx, found: Found) -> float | None:
        return PRICE_ALARM_MONTH


def alarm_name(config: CloudConfig, threshold: float) -> str:
    return config.resource_name(f"billing-{_amount(threshold)}usd")


def _alarm_owned(ctx: Ctx, alarm: dict[str, Any]) -> bool:
    tags = ctx.call(
        "cloudwatch", "list_tags_for_resource", region=BILLING_REGION, ResourceARN=alarm["AlarmArn"]
    )
    return is_owned(from_tag_list(tags.get("Tags")), ctx.name)


def _alarm_found(alarm: dict[str, Any]) -> Found:
    return Found(
        id=alarm["AlarmName"],
        name=alarm["AlarmName"],
        arn=alarm["AlarmArn"],
        state=alarm.get("StateValue", ""),
        data=alarm,
    )


BUDGET_ALERTS = (  # (notification type, percent of the budget)
    ("ACTUAL", 80.0),
    ("ACTUAL", 100.0),
    ("FORECASTED", 100.0),
)


class Budget(Kind):
    """A monthly cost budget with actual and forecast alerts to the billing topic."""

    key = "budget"
    title = "Budget"
    region = BILLING_REGION

    def budget_arn(self, ctx: Ctx) -> str:
        return f"arn:{ctx.partition}:budgets::{ctx.account_id}:budget/{self.label(ctx)}"

    def find(self, ctx: Ctx) -> list[Found]:
        got = ctx.call(
            "budgets",
            "describe_budget",
            region=self.region,
            AccountId=ctx.account_id,
            BudgetName=self.label(ctx),
            ignore=("NotFoundException",),
        )
        if got is None:
            return []
        budget = got["Budget"]
        owned, note = self._owned(ctx)
        if not owned:
            return self.clash(ctx, f"AWS budget {budget['BudgetName']}")
        return [
            Found(
                id=budget["BudgetName"],
                name=budget["BudgetName"],
                arn=self.budget_arn(ctx),
                data=dict(budget, OwnershipNote=note),
            )
        ]

    def _owned(self, ctx: Ctx) -> tuple[bool, str]:
        try:
            tags = ctx.call(
                "budgets",
                "list_tags_for_resource",
                region=self.region,
                retry=False,
                ResourceARN=self.budget_arn(ctx),
            )
        except CloudError as exc:
            # Budgets gained tags in 2024; an endpoint without them (an emulator, a
            # partition that lags) answers "not implemented": then the exact name,
            # which embeds [cloud] name, is the best evidence of ownership there is.
            if exc.code in _UNSUPPORTED_CODES or (exc.status or 0) >= 500:
                return True, "budget tags unsupported by this endpoint: matched by name"
            raise
        return is_owned(from_tag_list(tags.get("ResourceTags")), ctx.name), ""

    def notifications(self) -> set[tuple[str, float]]:
        return set(BUDGET_ALERTS)

    def check(self, ctx: Ctx, found: Found) -> list[Drift]:
        drift = []
        amount = float(found.data.get("BudgetLimit", {}).get("Amount", -1))
        if abs(amount - ctx.config.budget_usd) > 0.005:
            drift.append(
                Drift(
                    Action.REPLACE,
                    f"limit is {_amount(amount)} USD, config says {_amount(ctx.config.budget_usd)}",
                )
            )
        got = ctx.call(
            "budgets",
            "describe_notifications_for_budget",
            region=self.region,
            AccountId=ctx.account_id,
            BudgetName=found.id,
        )
        have = {
            (n["NotificationType"], float(n["Threshold"])) for n in got.get("Notifications", [])
        }
        if have != self.notifications():
            drift.append(Drift(Action.REPLACE, "alerts differ"))
        return drift

    def create(self, ctx: Ctx) -> Found:
        name = self.label(ctx)
        subscribers = [{"SubscriptionType": "SNS", "Address": ctx.billing_topic_arn}]
        ctx.call(
            "budgets",
            "create_budget",
            region=self.region,
            AccountId=ctx.account_id,
            Budget={
                "BudgetName": name,
                "BudgetLimit": {"Amount": f"{ctx.config.budget_usd:.2f}", "Unit": "USD"},
                "TimeUnit": "MONTHLY",
                "BudgetType": "COST",
            },
            NotificationsWithSubscribers=[
                {
                    "Notification": {
                        "NotificationType": kind,
                        "ComparisonOperator": "GREATER_THAN",
                        "Threshold": percent,
                        "ThresholdType": "PERCENTAGE",
                    },
                    "Subscribers": subscribers,
                }
                for kind, percent in BUDGET_ALERTS
            ],
            ResourceTags=as_tag_list(ctx.tags(self.key)),
        )
        limit = {"Amount": f"{ctx.config.budget_usd:.2f}", "Unit": "USD"}
        return Found(id=name, name=name, arn=self.budget_arn(ctx), data={"BudgetLimit": limit})

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.delete(
            "budgets",
            "delete_budget",
            region=self.region,
            AccountId=ctx.account_id,
            BudgetName=found.id,
        )

    def describe(self, ctx: Ctx, found: Found) -> str:
        amount = found.data.get("BudgetLimit", {}).get("Amount")
        text = f"{_amount(float(amount))} USD/month" if amount else ""
        note = found.data.get("OwnershipNote")
        return f"{text} ({note})" if note else text


_UNSUPPORTED_CODES = frozenset(
    {"NotImplemented", "InvalidAction", "UnknownOperationException", "UnsupportedOperation"}
)


# ----------------------------------------------------- fleet leftovers (teardown)


def _fleet_filters(ctx: Ctx) -> list[dict[str, Any]]:
    return ec2_filters(ctx.name)


LIVE_INSTANCE_STATES = ["pending", "running", "stopping", "stopped"]


class Instances(Kind):
    """Instances tagged for this setup other than the NAT: fleets, image builders."""

    key = "instances"
    title = "Instance"

    def wanted(self, config: CloudConfig) -> bool:
        return False

    def find(self, ctx: Ctx) -> list[Found]:
        reservations = ctx.describe(
            "describe_instances",
            "Reservations",
            Filters=[
                *_fleet_filters(ctx),
                {"Name": "instance-state-name", "Values": [*LIVE_INSTANCE_STATES, "shutting-down"]},
            ],
        )
        out = []
        for r in reservations:
            for inst in r.get("Instances", []):
                tags = from_tag_list(inst.get("Tags"))
                if tags.get(TAG_COMPONENT) == "nat-instance":
                    continue
                if tags.get(TAG_FLEET):
                    label = f"fleet {tags[TAG_FLEET]}"
                else:
                    label = tags.get(TAG_ROLE, "instance")
                out.append(
                    Found(id=inst["InstanceId"], name=label, state=inst["State"]["Name"], data=inst)
                )
        return out

    def delete(self, ctx: Ctx, found: Found) -> None:
        terminate_instances(ctx, [found.id])

    def monthly_usd(self, ctx: Ctx, found: Found) -> float | None:
        return instance_monthly_usd(ctx, found.data)


class FleetRequests(Kind):
    key = "ec2-fleets"
    title = "EC2 fleet"

    def wanted(self, config: CloudConfig) -> bool:
        return False

    def find(self, ctx: Ctx) -> list[Found]:
        out = []
        for page in ctx.aws.pages("ec2", "describe_fleets", Filters=_fleet_filters(ctx)):
            for fleet in page.get("Fleets", []):
                if not str(fleet.get("FleetState", "")).startswith("deleted"):
                    out.append(Found(id=fleet["FleetId"], name="fleet", state=fleet["FleetState"]))
        return out

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.delete("ec2", "delete_fleets", FleetIds=[found.id], TerminateInstances=True)


class SpotRequests(Kind):
    key = "spot-requests"
    title = "Spot request"

    def wanted(self, config: CloudConfig) -> bool:
        return False

    def find(self, ctx: Ctx) -> list[Found]:
        items = ctx.describe(
            "describe_spot_instance_requests",
            "SpotInstanceRequests",
            Filters=[*_fleet_filters(ctx), {"Name": "state", "Values": ["open", "active"]}],
        )
        return [
            Found(id=i["SpotInstanceRequestId"], name="spot request", state=i["State"])
            for i in items
        ]

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.delete("ec2", "cancel_spot_instance_requests", SpotInstanceRequestIds=[found.id])


class LaunchTemplates(Kind):
    key = "launch-templates"
    title = "Launch template"

    def wanted(self, config: CloudConfig) -> bool:
        return False

    def find(self, ctx: Ctx) -> list[Found]:
        items = ctx.describe(
            "describe_launch_templates", "LaunchTemplates", Filters=_fleet_filters(ctx)
        )
        return [Found(id=i["LaunchTemplateId"], name=i["LaunchTemplateName"]) for i in items]

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.delete("ec2", "delete_launch_template", LaunchTemplateId=found.id)


class Images(Kind):
    key = "images"
    title = "Image (AMI)"

    def wanted(self, config: CloudConfig) -> bool:
        return False

    def find(self, ctx: Ctx) -> list[Found]:
        items = ctx.ec2("describe_images", Owners=["self"], Filters=_fleet_filters(ctx))
        return [
            Found(id=i["ImageId"], name=i.get("Name", ""), state=i.get("State", ""), data=i)
            for i in items.get("Images", [])
        ]

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.delete("ec2", "deregister_image", ImageId=found.id)


class Snapshots(Kind):
    key = "snapshots"
    title = "Snapshot"

    def wanted(self, config: CloudConfig) -> bool:
        return False

    def find(self, ctx: Ctx) -> list[Found]:
        items = ctx.describe(
            "describe_snapshots", "Snapshots", OwnerIds=["self"], Filters=_fleet_filters(ctx)
        )
        return [
            Found(id=i["SnapshotId"], name="snapshot", state=i.get("State", ""), data=i)
            for i in items
        ]

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.delete("ec2", "delete_snapshot", SnapshotId=found.id)

    def monthly_usd(self, ctx: Ctx, found: Found) -> float | None:
        return found.data.get("VolumeSize", 0) * PRICE_SNAPSHOT_GB_MONTH


class Volumes(Kind):
    key = "volumes"
    title = "Detached volume"

    def wanted(self, config: CloudConfig) -> bool:
        return False

    def find(self, ctx: Ctx) -> list[Found]:
        items = ctx.describe(
            "describe_volumes",
            "Volumes",
            Filters=[*_fleet_filters(ctx), {"Name": "status", "Values": ["available"]}],
        )
        return [Found(id=i["VolumeId"], name="volume", state=i["State"], data=i) for i in items]

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.delete("ec2", "delete_volume", VolumeId=found.id)

    def monthly_usd(self, ctx: Ctx, found: Found) -> float | None:
        price = PRICE_EBS_GB_MONTH.get(found.data.get("VolumeType", "gp3"), 0.10)
        return found.data.get("Size", 0) * price


class Parameters(Kind):
    """SSM parameters below ``/pygirder/<name>/`` that pygirder wrote."""

    key = "ssm-parameters"
    title = "SSM parameter"

    def wanted(self, config: CloudConfig) -> bool:
        return False

    def find(self, ctx: Ctx) -> list[Found]:
        out = []
        for page in ctx.aws.pages(
            "ssm", "get_parameters_by_path", Path=ctx.config.ssm_prefix.rstrip("/"), Recursive=True
        ):
            for param in page.get("Parameters", []):
                tags = ctx.call(
                    "ssm",
                    "list_tags_for_resource",
                    ResourceType="Parameter",
                    ResourceId=param["Name"],
                )
                if is_owned(from_tag_list(tags.get("TagList")), ctx.name):
                    out.append(Found(id=param["Name"], name=param["Name"]))
        return out

    def delete(self, ctx: Ctx, found: Found) -> None:
        ctx.delete("ssm", "delete_parameter", Name=found.id)


def terminate_instances(ctx: Ctx, ids: list[str]) -> None:
    """Terminate instances and wait (bounded) until they are gone."""
    if not ids:
        return
    ctx.delete("ec2", "terminate_instances", InstanceIds=ids)

    def terminated() -> bool:
        got = ctx.ec2("describe_instances", InstanceIds=ids, ignore=("InvalidInstanceID.NotFound",))
        states = [
            inst["State"]["Name"]
            for r in (got or {}).get("Reservations", [])
            for inst in r.get("Instances", [])
        ]
        return all(s == "terminated" for s in states)

    ctx.aws.wait_for(
        terminated,
        what=f"instances {', '.join(ids)} to terminate",
        timeout=WAIT_INSTANCE[0],
        interval=WAIT_INSTANCE[1],
    )


def instance_monthly_usd(ctx: Ctx, inst: dict[str, Any]) -> float | None:
    """What an instance costs per month in its current state (compute + IPv4 + disks)."""
    state = inst.get("State", {}).get("Name", "")
    if state in ("terminated", "shutting-down"):
        return 0.0
    volumes = [m["Ebs"]["VolumeId"] for m in inst.get("BlockDeviceMappings", []) if m.get("Ebs")]
    disks = 0.0
    if volumes:
        got = ctx.ec2("describe_volumes", VolumeIds=volumes, ignore=("InvalidVolume.NotFound",))
        for vol in (got or {}).get("Volumes", []):
            disks += vol.get("Size", 0) * PRICE_EBS_GB_MONTH.get(vol.get("VolumeType"), 0.10)
    if state in ("stopped", "stopping"):
        return disks
    hourly = PRICE_INSTANCE_HOUR.get(inst.get("InstanceType", ""))
    if hourly is None:
        return None  # unknown type: say so rather than guess
    ipv4 = PRICE_PUBLIC_IPV4_HOUR if inst.get("PublicIpAddress") else 0.0
    return (hourly + ipv4) * HOURS_PER_MONTH + disks


# ------------------------------------------------------------------ the lists


def account_kinds(config: CloudConfig) -> list[Kind]:
    """Every account-level kind, in creation order (teardown walks it backwards).

    Kinds the config does not want (the other NAT flavour, old alarms) stay in the
    list: setup deletes them if they exist, teardown deletes everything.
    """
    return [
        PermissionsBoundary(),
        InstanceRole(),
        InstanceProfile(),
        Bucket(),
        StatusTopic(),
        StatusQueue(),
        StatusSubscription(),
        UserKey(),
        ClusterKey(),
        Vpc(),
        InternetGateway(),
        Subnet(public=True),
        Subnet(public=False),
        RouteTable(public=True),
        SecurityGroup(nat=False),
        SecurityGroup(nat=True),
        NatInstance(),
        NatAddress(),
        NatGateway(),
        RouteTable(public=False),
        S3Endpoint(),
        BillingTopic(),
        BillingEmail(),
        *[BillingAlarm(t) for t in config.alarm_thresholds_usd],
        OldBillingAlarms(),
        Budget(),
    ]


def leftover_kinds() -> list[Kind]:
    """What fleet and image commands create, in the order teardown removes it."""
    return [
        FleetRequests(),
        SpotRequests(),
        Instances(),
        LaunchTemplates(),
        Images(),
        Snapshots(),
        Volumes(),
        Parameters(),
    ]


# ------------------------------------------------------------------ commands


def _context(config: CloudConfig, aws: Aws | None, progress: Progress | None) -> Ctx:
    return Ctx(config, aws or Aws(config), progress)


def _preflight(ctx: Ctx, *, for_setup: bool) -> list[str]:
    """Check what can be checked before touching anything; return warnings."""
    config = ctx.config
    warnings = list(config.warnings)
    if for_setup:
        config.require_ssh_source()
        created = ensure_key_pair(config)
        if created is not None:
            warnings.append(
                f"created an SSH key pair for pygirder: {created} (private, mode 0600) and "
                f"{config.public_key_path}, because {config.public_key_file} does not "
                "exist; set [cloud] public_key_file to use your own key instead"
            )
        ctx.public_key = read_public_key(config)
    else:
        if not config.ssh_from:
            warnings.append(
                "[cloud] ssh_from is not set: setup will refuse until it is "
                '(e.g. ssh_from = "203.0.113.7/32").'
            )
        try:
            ctx.public_key = read_public_key(config)
        except CloudConfigError as exc:
            warnings.append(str(exc))
    ctx.aws.account_id  # noqa: B018 - fail early and clearly on credentials
    zones = ctx.ec2("describe_availability_zones").get("AvailabilityZones", [])
    names = sorted(z["ZoneName"] for z in zones if z.get("State", "available") == "available")
    if config.zone not in names:
        raise CloudConfigError(
            f"[cloud] zone {config.zone!r} is not available in region {config.region} for "
            f"this account; available zones: {', '.join(names) or 'none'}",
            problems=[("zone", config.zone, f"one of {', '.join(names)}")],
        )
    if config.alert_email is None:
        warnings.append(
            "[cloud] alert_email is not set: billing alarms and budget alerts go to the "
            "billing topic with nobody subscribed."
        )
    return warnings


def _discover(ctx: Ctx, kinds: list[Kind]) -> list[tuple[Kind, Item, list[Found], list[Drift]]]:
    """Find every kind and decide what setup would do with it."""
    rows = []
    for kind in kinds:
        found = kind.find(ctx)
        ctx.found[kind.key] = found
        wanted = kind.wanted(ctx.config)
        clash = ctx.clashes.get(kind.key)
        drift: list[Drift] = []
        if not wanted:
            for f in found:
                item = _item(ctx, kind, f, Action.DELETE, "no longer wanted by the config")
                rows.append((kind, item, [f], drift))
            continue
        if clash:
            item = Item(kind.key, kind.title, kind.label(ctx), Action.CONFLICT, detail=clash)
        elif len(found) > 1:
            ids = ", ".join(f.id for f in found)
            item = _item(
                ctx,
                kind,
                found[0],
                Action.CONFLICT,
                f"{len(found)} found ({ids}): this is likely a resource leak; run "
                "`pygirder cloud teardown` and set up again",
            )
        elif found:
            drift = kind.check(ctx, found[0])
            action = max((d.action for d in drift), key=_SEVERITY.__getitem__, default=Action.NONE)
            item = _item(ctx, kind, found[0], action, "; ".join(d.text for d in drift))
        else:
            item = Item(kind.key, kind.title, kind.label(ctx), Action.CREATE, state="missing")
        rows.append((kind, item, found, drift))
    return rows


_SEVERITY = {Action.NONE: 0, Action.UPDATE: 1, Action.REPLACE: 2, Action.CONFLICT: 3}


def _item(ctx: Ctx, kind: Kind, found: Found, action: Action, detail: str = "") -> Item:
    return Item(
        kind.key,
        kind.title,
        found.name or kind.label(ctx),
        action,
        id=found.id,
        state=found.state,
        detail=detail,
    )


def plan(
    config: CloudConfig, *, aws: Aws | None = None, progress: Progress | None = None
) -> Report:
    """What :func:`setup` would create, change or delete.  Changes nothing."""
    ctx = _context(config, aws, progress)
    report = Report("plan", warnings=_preflight(ctx, for_setup=False))
    report.items = [item for _, item, _, _ in _discover(ctx, account_kinds(config))]
    return report


def setup(
    config: CloudConfig, *, aws: Aws | None = None, progress: Progress | None = None
) -> Report:
    """Create what is missing, fix what drifted; a no-op when all is as configured.

    Raises :class:`ResourceConflictError` before changing anything if a name is held
    by something pygirder did not create (or a resource is duplicated).
    """
    ctx = _context(config, aws, progress)
    report = Report("setup", warnings=_preflight(ctx, for_setup=True))
    rows = _discover(ctx, account_kinds(config))
    conflicts = [item for _, item, _, _ in rows if item.action is Action.CONFLICT]
    if conflicts:
        lines = "\n".join(f"  - {i.title} {i.name}: {i.detail}" for i in conflicts)
        raise ResourceConflictError(
            f"setup stopped before changing anything:\n{lines}", items=conflicts
        )
    deletions = []
    for kind, item, found, drift in rows:
        if item.action is Action.DELETE:
            deletions.append((kind, item, found[0]))
            continue
        if item.action is Action.NONE:
            report.items.append(item)
            continue
        ctx.say(f"{_VERB[item.action]} {kind.title} {item.name}")
        if item.action is Action.CREATE:
            result = kind.create(ctx)
        elif item.action is Action.REPLACE:
            kind.delete(ctx, found[0])
            result = kind.create(ctx)
        else:
            result = kind.update(ctx, found[0], drift)
        ctx.found[kind.key] = [result]
        item.id, item.state = result.id, result.state
        item.name = result.name or item.name
        item.detail = "; ".join(filter(None, [item.detail, kind.describe(ctx, result)]))
        report.items.append(item)
    for kind, item, found in reversed(deletions):
        ctx.say(f"deleting {kind.title} {item.name} ({found.id}): {item.detail}")
        kind.delete(ctx, found)
        ctx.found[kind.key] = []
        report.items.append(item)
    return report


_VERB = {Action.CREATE: "creating", Action.UPDATE: "updating", Action.REPLACE: "replacing"}


def status(
    config: CloudConfig, *, aws: Aws | None = None, progress: Progress | None = None
) -> Report:
    """Every resource, its state, and the monthly cost of what is left running."""
    ctx = _context(config, aws, progress)
    report = Report("status", warnings=list(config.warnings))
    for kind in [*account_kinds(config), *leftover_kinds()]:
        found = kind.find(ctx)
        ctx.found[kind.key] = found
        clash = ctx.clashes.get(kind.key)
        if clash:
            report.items.append(
                Item(kind.key, kind.title, kind.label(ctx), state="not ours", detail=clash)
            )
            continue
        if not found and kind.wanted(config):
            report.items.append(
                Item(kind.key, kind.title, kind.label(ctx), state="missing", monthly_usd=0.0)
            )
        for f in found:
            item = _item(ctx, kind, f, Action.NONE)
            item.action = None
            item.monthly_usd = kind.monthly_usd(ctx, f)
            item.detail = kind.describe(ctx, f)
            if not kind.wanted(config):
                item.detail = (item.detail + "; " if item.detail else "") + (
                    "left over: teardown removes it"
                )
            report.items.append(item)
    return report


def fleet_instances(config: CloudConfig, *, aws: Aws | None = None) -> list[dict[str, Any]]:
    """Live instances of this setup's fleets (tagged ``pygirder:fleet``)."""
    ctx = _context(config, aws, None)
    return _fleet_instances(ctx)


def _fleet_instances(ctx: Ctx) -> list[dict[str, Any]]:
    reservations = ctx.describe(
        "describe_instances",
        "Reservations",
        Filters=[
            {"Name": f"tag:{TAG_NAME}", "Values": [ctx.name]},
            {"Name": "tag-key", "Values": [TAG_FLEET]},
            {"Name": "instance-state-name", "Values": LIVE_INSTANCE_STATES},
        ],
    )
    return [inst for r in reservations for inst in r.get("Instances", [])]


def teardown(
    config: CloudConfig,
    *,
    aws: Aws | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> Report:
    """Delete everything tagged for this setup, in dependency order, then prove it.

    Refuses (:class:`FleetAliveError`) while fleet instances are alive, unless
    ``force``: then they are terminated first.  Failures do not stop the rest; they
    are reported as ``failed`` items, and ``remaining`` lists what is still tagged.
    """
    ctx = _context(config, aws, progress)
    report = Report("teardown", warnings=list(config.warnings))
    alive = _fleet_instances(ctx)
    if alive and not force:
        ids = [i["InstanceId"] for i in alive]
        raise FleetAliveError(
            f"{len(ids)} fleet instance(s) of {config.name!r} are still alive "
            f"({', '.join(ids[:10])}{', ...' if len(ids) > 10 else ''}): stop the fleet "
            "first (`pygirder cloud down`), or pass --force to terminate them too.",
            instance_ids=ids,
        )
    kinds = leftover_kinds() + [k for k in reversed(account_kinds(config)) if not k.shared]
    # Discover in creation order (the subscription needs the topic), delete backwards.
    for kind in reversed(kinds):
        ctx.found[kind.key] = kind.find(ctx)
    for kind in kinds:
        for found in ctx.found.get(kind.key, []):
            item = _item(ctx, kind, found, Action.DELETE)
            ctx.say(f"deleting {kind.title} {item.name} ({found.id})")
            try:
                kind.delete(ctx, found)
                item.state = "deleted"
            except CredentialsError:
                raise  # every later call would fail the same way
            except CloudError as exc:
                ctx.failed = True
                item.action, item.state, item.detail = Action.FAILED, "failed", str(exc)
                ctx.say(f"  failed: {exc}")
            report.items.append(item)
    report.remaining = verify_clean(config, aws=ctx.aws)
    return report


def verify_clean(config: CloudConfig, *, aws: Aws | None = None) -> list[str]:
    """Everything still tagged ``pygirder:name=<name>``: every kind is asked again,
    and the Resource Groups Tagging API is asked for anything else so tagged."""
    ctx = _context(config, aws, None)
    left: list[str] = []
    known: set[str] = set()
    for kind in account_kinds(config) + leftover_kinds():
        if kind.shared:
            continue
        for found in kind.find(ctx):
            ctx.found.setdefault(kind.key, []).append(found)
            left.append(f"{kind.title} {found.name} ({found.id}, {found.state})")
            known.update({found.id, found.arn})
    regions = sorted({config.region, BILLING_REGION})
    for region in regions:
        for page in ctx.aws.pages(
            "resourcegroupstaggingapi",
            "get_resources",
            token="PaginationToken",
            region=region,
            TagFilters=[
                {"Key": TAG_MANAGED, "Values": ["true"]},
                {"Key": TAG_NAME, "Values": [config.name]},
            ],
        ):
            for mapping in page.get("ResourceTagMappingList", []):
                arn = mapping["ResourceARN"]
                resource_id = re.split(r"[/:]", arn)[-1]
                if arn in known or resource_id in known or _gone(ctx, arn, region):
                    continue
                left.append(f"tagged resource {arn}")
    return left


def _gone(ctx: Ctx, arn: str, region: str) -> bool:
    """The tagging API lists some resources for a while after deletion."""
    match = re.match(r"arn:[^:]+:ec2:[^:]*:[^:]*:(instance|natgateway|vpc-endpoint)/(.+)$", arn)
    if not match:
        return False
    kind, rid = match.groups()
    if kind == "instance":
        got = ctx.call(
            "ec2",
            "describe_instances",
            region=region,
            InstanceIds=[rid],
            ignore=("InvalidInstanceID.NotFound",),
        )
        states = [
            i["State"]["Name"] for r in (got or {}).get("Reservations", []) for i in r["Instances"]
        ]
        return all(s == "terminated" for s in states)
    if kind == "natgateway":
        got = ctx.call(
            "ec2",
            "describe_nat_gateways",
            region=region,
            NatGatewayIds=[rid],
            ignore=("NatGatewayNotFound", "InvalidNatGatewayID.NotFound"),
        )
        return all(g["State"] in ("deleted", "failed") for g in (got or {}).get("NatGateways", []))
    got = ctx.call(
        "ec2",
        "describe_vpc_endpoints",
        region=region,
        VpcEndpointIds=[rid],
        ignore=("InvalidVpcEndpointId.NotFound",),
    )
    return all(
        e["State"].lower() in ("deleted", "deleting") for e in (got or {}).get("VpcEndpoints", [])
    )


# ----------------------------------------------------------- for other modules


def account_resources(
    config: CloudConfig, *, aws: Aws | None = None, strict: bool = True
) -> dict[str, Any]:
    """Ids and ARNs of the account resources, discovered by tag, for fleet code.

    Keys: ``name, region, zone, account_id, bucket, artifact_prefix, ssm_prefix,
    topic_arn, queue_url, queue_arn, role_name, role_arn, instance_profile_name,
    instance_profile_arn, vpc_id, public_subnet_id, private_subnet_id, subnet_ids,
    security_group_id, key_name, cluster_key_name, cluster_key_file, nat,
    nat_instance_id, nat_gateway_id, billing_topic_arn``.

    The status queue receives the status topic's messages with raw delivery: a
    message body is exactly what an instance published.  With ``strict`` (the
    default) a missing resource raises :class:`NotSetUpError`; otherwise its value
    is ``None``.
    """
    ctx = _context(config, aws, None)
    wanted = [k for k in account_kinds(config) if k.wanted(config)]
    found = {}
    for kind in wanted:
        items = kind.find(ctx)
        ctx.found[kind.key] = items
        found[kind.key] = items[0] if items else None
    required = [
        "role",
        "instance-profile",
        "bucket",
        "status-topic",
        "status-queue",
        "status-subscription",
        "user-key",
        "cluster-key",
        "vpc",
        "public-subnet",
        "private-subnet",
        "cluster-sg",
        "nat-instance" if config.nat == "instance" else "nat-gateway",
    ]
    missing = [key for key in required if found.get(key) is None]
    if missing and strict:
        raise NotSetUpError(
            f"the AWS account is not set up for {config.name!r} (missing: "
            f"{', '.join(missing)}): run `pygirder cloud setup`",
            missing=missing,
        )

    def attr(key: str, name: str = "id") -> Any:
        f = found.get(key)
        return getattr(f, name) if f is not None else None

    public, private = attr("public-subnet"), attr("private-subnet")
    return {
        "name": config.name,
        "region": config.region,
        "zone": config.zone,
        "account_id": ctx.account_id,
        "bucket": attr("bucket"),
        "artifact_prefix": config.artifact_prefix,
        "ssm_prefix": config.ssm_prefix,
        "topic_arn": attr("status-topic"),
        "queue_url": attr("status-queue"),
        "queue_arn": attr("status-queue", "arn"),
        "role_name": attr("role"),
        "role_arn": attr("role", "arn"),
        "instance_profile_name": attr("instance-profile"),
        "instance_profile_arn": attr("instance-profile", "arn"),
        "vpc_id": attr("vpc"),
        "public_subnet_id": public,
        "private_subnet_id": private,
        "subnet_ids": {"public": public, "private": private},
        "security_group_id": attr("cluster-sg"),
        "key_name": attr("user-key", "name"),
        "cluster_key_name": attr("cluster-key", "name"),
        "cluster_key_file": str(config.cluster_key_path),
        "nat": config.nat,
        "nat_instance_id": attr("nat-instance"),
        "nat_gateway_id": attr("nat-gateway"),
        "billing_topic_arn": attr("billing-topic"),
    }


def start_nat(config: CloudConfig, *, aws: Aws | None = None, wait: bool = True) -> str | None:
    """Start the NAT instance (fleet ``up``); returns its id, ``None`` for a gateway."""
    ctx = _context(config, aws, None)
    nat = NatInstance()
    found = nat.find(ctx)
    if not found:
        if config.nat == "gateway":
            return None
        raise NotSetUpError("no NAT instance: run `pygirder cloud setup`", missing=[nat.key])
    iid, state = found[0].id, found[0].state
    if state == "stopping":
        nat._wait_state(ctx, iid, "stopped")
        state = "stopped"
    if state == "stopped":
        ctx.ec2("start_instances", InstanceIds=[iid])
    if wait and state != "running":
        nat._wait_state(ctx, iid, "running")
    return iid


def stop_nat(config: CloudConfig, *, aws: Aws | None = None) -> str | None:
    """Stop the NAT instance (fleet ``down``) so it costs only its disk."""
    ctx = _context(config, aws, None)
    found = NatInstance().find(ctx)
    if not found:
        return None
    if found[0].state in ("pending", "running"):
        ctx.ec2("stop_instances", InstanceIds=[found[0].id])
    return found[0].id


# ----------------------------------------------------------------- small helpers


def _as_json(value: Any) -> dict[str, Any]:
    """A policy document as a dict, whether AWS returned a dict or (encoded) text."""
    if isinstance(value, dict):
        return value
    if not value:
        return {}
    from urllib.parse import unquote

    text = str(value)
    if text.startswith("%7B"):
        text = unquote(text)
    return json.loads(text)


def _same_json(a: Any, b: Any) -> bool:
    return _canonical(a) == _canonical(b)


def _canonical(value: Any) -> Any:
    """Compare policies as IAM does: key order and one-element lists do not matter."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        items = [_canonical(v) for v in value]
        if len(items) == 1 and not isinstance(items[0], dict):
            return items[0]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    return value


def _human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} B"  # pragma: no cover
