"""The engine every resource kind runs in: the :class:`Kind` protocol and :class:`Ctx`.

A :class:`Ctx` is what one command run shares (config, the AWS adaptor, what was
found so far); a :class:`Kind` is one kind of resource with the verbs ``find``,
``check``, ``create``, ``update``, ``delete`` and its idle ``monthly_usd``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .. import leftovers
from ..aws import DEPENDENCY_RETRY, Aws
from ..config import CloudConfig
from ..errors import CloudError, NotSetUpError
from ..leftovers import INSTANCES, Scope, wait_terminated
from ..policy import (
    partition,
)
from ..tags import (
    TAG_MANAGED,
    TAG_NAME,
    as_tag_list,
    ec2_filters,
    ownership_tags,
)
from .model import Drift, Found

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
        """:meth:`Aws.delete` (gone is fine, dependents are waited out), which stops
        retrying once an earlier delete of this run failed."""
        return self.aws.delete(
            service,
            operation,
            region=region,
            keep_going=lambda: not self.failed,
            on_retry=self.retrying,
            **params,
        )

    def retrying(self, exc: CloudError, delay: float, attempt: int) -> None:
        """Say that a delete waits for dependents to go away."""
        self.say(
            f"  {exc.service}:{exc.operation}: {exc.code}, retrying in {delay:.0f}s "
            f"(attempt {attempt}/{DEPENDENCY_RETRY.attempts})"
        )

    def terminate(self, ids: list[str]) -> None:
        """Terminate instances and wait (bounded) until they are gone."""
        INSTANCES.delete(self.aws, ids, keep_going=lambda: not self.failed, on_retry=self.retrying)
        wait_terminated(self.aws, ids, *WAIT_INSTANCE)

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


class LeftoverKind(Kind):
    """A kind of :mod:`pygirder.cloud.leftovers` as the account engine sees it: found
    for the whole setup (image builds too), never wanted, deleted by teardown."""

    def __init__(self, kind: leftovers.Kind) -> None:
        self.kind = kind
        self.key = kind.key
        self.title = kind.title

    def wanted(self, config: CloudConfig) -> bool:
        return False

    def find(self, ctx: Ctx) -> list[Found]:
        return [
            Found(id=item.id, name=item.label, state=item.state, data=item.data)
            for item in self.kind.find(ctx.aws, Scope.setup(ctx.name))
        ]

    def delete(self, ctx: Ctx, found: Found) -> None:
        if self.kind is INSTANCES:
            ctx.terminate([found.id])
        else:
            self.kind.delete(
                ctx.aws, [found.id], keep_going=lambda: not ctx.failed, on_retry=ctx.retrying
            )

    def monthly_usd(self, ctx: Ctx, found: Found) -> float | None:
        return self.kind.monthly_usd(ctx.aws, found.data)


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
