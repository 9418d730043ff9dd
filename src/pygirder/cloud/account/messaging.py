"""SNS and SQS kinds: the fleet's status topic and queue, the billing topic."""

from __future__ import annotations

import json
from typing import Any

from ..tags import (
    as_tag_list,
    from_tag_list,
    is_owned,
)
from .kind import BILLING_REGION, WAIT_QUEUE_NAME, Ctx, Kind
from .model import Action, Drift, Found, as_json, same_json

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
        have = as_json(found.data.get("Policy") or "{}")
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
                same_json(as_json(have or "{}"), as_json(want))
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
