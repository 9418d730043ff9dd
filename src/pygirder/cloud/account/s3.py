"""The artifact bucket: private, encrypted, versioned, old artifacts and results expire.

It also holds the fleets' durable result store under ``results/``: kept across
``pygirder cloud down`` (the next fleet answers calls from it), expired after
``result_retention_days`` by a lifecycle rule, deleted with the bucket at teardown.
"""

from __future__ import annotations

from typing import Any

from ..config import RESULT_PREFIX
from ..errors import AccessDeniedError, CloudError, ResourceConflictError
from ..pricing import PRICE_S3_GB_MONTH
from ..tags import (
    as_tag_list,
    from_tag_list,
    is_owned,
)
from .kind import LIFECYCLE_RULE_ID, RESULTS_RULE_ID, Ctx, Kind
from .model import Action, Drift, Found, human_bytes

# Listing a huge bucket to price it is not worth it: stop counting after this many.
S3_COUNT_LIMIT = 100_000

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

    def _results_lifecycle(self, ctx: Ctx) -> dict[str, Any]:
        return {
            "ID": RESULTS_RULE_ID,
            "Status": "Enabled",
            "Filter": {"Prefix": RESULT_PREFIX},
            "Expiration": {"Days": ctx.config.result_retention_days},
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
        rule, want = rules.get(RESULTS_RULE_ID), self._results_lifecycle(ctx)
        if rule is None or any(rule.get(k) != want[k] for k in ("Expiration", "Filter")):
            drift.append(Drift(Action.UPDATE, "results lifecycle rule missing or different"))
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
        ours = (LIFECYCLE_RULE_ID, RESULTS_RULE_ID)
        others = [r for r in (lc or {}).get("Rules", []) if r.get("ID") not in ours]
        ctx.call(
            "s3",
            "put_bucket_lifecycle_configuration",
            Bucket=name,
            LifecycleConfiguration={
                "Rules": [*others, self._lifecycle(ctx), self._results_lifecycle(ctx)]
            },
        )
        return found

    def delete(self, ctx: Ctx, found: Found) -> None:
        name = found.id
        deleted = 0
        # Each round lists from the start again rather than after a key marker: the
        # keys before the marker are gone, and a listing resumed after them can skip
        # whole pages (moto does).  A round that deletes nothing would loop forever, so
        # a refused delete is an error.
        while True:
            page = ctx.call("s3", "list_object_versions", ignore=("NoSuchBucket",), Bucket=name)
            if page is None:
                return
            objects = [
                {"Key": v["Key"], "VersionId": v["VersionId"]}
                for v in page.get("Versions", []) + page.get("DeleteMarkers", [])
            ]
            if not objects:
                break
            for start in range(0, len(objects), 1000):
                reply = ctx.call(
                    "s3",
                    "delete_objects",
                    Bucket=name,
                    Delete={"Objects": objects[start : start + 1000], "Quiet": True},
                )
                errors = (reply or {}).get("Errors") or []
                if errors:
                    first = errors[0]
                    raise CloudError(
                        f"could not empty bucket {name}: {len(errors)} objects refused, "
                        f"e.g. {first.get('Key')}: {first.get('Code')}: {first.get('Message')}",
                        service="s3",
                        operation="delete_objects",
                        code=str(first.get("Code", "")),
                    )
            deleted += len(objects)
        if deleted:
            ctx.say(f"  emptied bucket {name} ({deleted} object versions)")
        ctx.delete("s3", "delete_bucket", Bucket=name)

    def _size(self, ctx: Ctx, name: str, prefix: str = "") -> tuple[int, int, bool]:
        count = size = 0
        for page in ctx.aws.pages(
            "s3",
            "list_objects_v2",
            token="ContinuationToken",
            next_token="NextContinuationToken",
            Bucket=name,
            Prefix=prefix,
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
        text = f"{count}{'+' if more else ''} objects, {human_bytes(size)}"
        results, rsize, rmore = self._size(ctx, found.id, RESULT_PREFIX)
        if results:
            cost = rsize / 1e9 * PRICE_S3_GB_MONTH
            text += (f"; results: {results}{'+' if rmore else ''}, {human_bytes(rsize)}, "
                     f"${cost:.2f}/month")  # fmt: skip
        return text


_PUBLIC_ACCESS_BLOCK = (
    "BlockPublicAcls",
    "IgnorePublicAcls",
    "BlockPublicPolicy",
    "RestrictPublicBuckets",
)
