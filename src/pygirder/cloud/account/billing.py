"""Cost guards: the billing e-mail subscription, CloudWatch billing alarms, a budget."""

from __future__ import annotations

from typing import Any

from ..config import CloudConfig
from ..errors import CloudError
from ..pricing import PRICE_ALARM_MONTH
from ..tags import (
    as_tag_list,
    from_tag_list,
    is_owned,
)
from .kind import BILLING_REGION, Ctx, Kind
from .model import Action, Drift, Found

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
