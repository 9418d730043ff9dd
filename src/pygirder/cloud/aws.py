"""The boto3 adaptor: sessions and clients for a CloudConfig, retries, readable errors.

boto3 is imported only when a session is made, with an install hint when it is
missing, so ``pygirder`` itself (and ``pygirder cloud --help``) never needs it.

Credentials come from the standard boto3 chain (``[cloud] profile`` or AWS_PROFILE,
SSO, environment variables, instance roles); the endpoint from boto3's own
AWS_ENDPOINT_URL handling, which is how tests point everything at a local moto server.

botocore's own retries are switched off; :meth:`Aws.call` retries *only* throttling
and server (5xx) errors, with capped exponential backoff and jitter, and turns every
other failure into one of the errors below, whose messages say what to do next.

The errors are drawn, with the rest of the cloud's, in :mod:`pygirder.cloud.errors`.

Threads: a boto3 Session is not thread-safe, clients are.  An :class:`Aws` makes its
session and clients once and is meant for one thread; give each thread its own.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import (
    AccessDeniedError,
    CloudDependencyError,
    CloudError,
    CloudTimeoutError,
    CredentialsError,
    QuotaExceededError,
)
from .policy import iam_action

if TYPE_CHECKING:
    from .config import CloudConfig

T = TypeVar("T")

INSTALL_HINT = "pip install 'pygirder[cloud]'"
POLICY_HINT = "`pygirder cloud policy` prints the IAM policy pygirder needs"
QUOTAS_URL = "https://console.aws.amazon.com/servicequotas/home?region={region}"

THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "SlowDown",
        "BandwidthLimitExceeded",
        "PriorRequestNotComplete",
        "EC2ThrottledException",
        "ProvisionedThroughputExceededException",
        "KMSThrottlingException",
    }
)
SERVER_ERROR_CODES = frozenset(
    {
        "InternalError",
        "InternalFailure",
        "InternalServerError",
        "InternalErrorException",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "Unavailable",
        "RequestTimeout",  # S3: the connection sat idle too long; sending again works
        "RequestTimeoutException",
    }
)
ACCESS_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "UnauthorizedOperation",
        "AuthorizationError",
        "AuthorizationErrorException",
        "UnauthorizedAccess",
        "Forbidden",
        "403",
    }
)
EXPIRED_CODES = frozenset(
    {"ExpiredToken", "ExpiredTokenException", "RequestExpired", "TokenRefreshRequired"}
)
INVALID_CREDENTIAL_CODES = frozenset(
    {
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "AuthFailure",
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "InvalidToken",
        "IncompleteSignature",
    }
)
QUOTA_CODES = frozenset(
    {
        "TooManyBuckets",
        "ServiceQuotaExceededException",
        "VcpuLimitExceeded",
        "MaxSpotInstanceCountExceeded",
        "InsufficientAddressCapacity",
        "CreationLimitExceededException",
        "InstanceLimitExceeded",
    }
)
# A spot pool (instance type x subnet) is out of capacity right now: try other pools
# now, this one again later.
CAPACITY_CODES = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InsufficientCapacity",
        "InsufficientFreeAddressesInSubnet",
        "UnfulfillableCapacity",
        "capacity-not-available",
        "SpotCapacityNotAvailable",
    }
)
# A pool that cannot work at all (type not offered there, price cap below the market).
POOL_UNUSABLE_CODES = frozenset(
    {"Unsupported", "SpotMaxPriceTooLow", "InvalidInstanceType", "InstanceTypeNotSupported"}
)
# AWS refuses a delete while it still sees dependents; they go away on their own.
DEPENDENCY_CODES = frozenset(
    {
        "DependencyViolation",
        "DeleteConflict",
        "InvalidIPAddress.InUse",
        "ResourceInUse",
        "InvalidNetworkInterface.InUse",
        "IncorrectState",
    }
)
# "That resource does not exist (any more)", besides every code containing "NotFound".
NOT_FOUND_CODES = frozenset(
    {
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

# EC2 instance states that still exist and may still bill (compute while running, the
# disks while stopped); "shutting-down" is on its way out but not gone yet.
LIVE_INSTANCE_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")


# ----------------------------------------------------------------------- retries


@dataclass(frozen=True)
class RetryPolicy:
    """How often to try a call and how long to sleep before each retry.

    The delay before retry ``n`` (1-based) is ``base_delay * 2**(n-1)`` capped at
    ``max_delay``; with ``jitter`` a random 50-100 % of that, so clients that failed
    together do not retry together.
    """

    attempts: int
    base_delay: float
    max_delay: float
    jitter: bool = True

    def delay(self, attempt: int) -> float:
        delay = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return delay * (0.5 + random.random() / 2) if self.jitter else delay


# Throttling and server errors, for every call (botocore's own retries are off).
TRANSIENT_RETRY = RetryPolicy(attempts=6, base_delay=0.5, max_delay=20.0)
# A delete AWS refuses while dependents remain: 2, 4, 8, 16, 30, 30 ... seconds.
DEPENDENCY_RETRY = RetryPolicy(attempts=10, base_delay=2.0, max_delay=30.0, jitter=False)


# ---------------------------------------------------------------- boto3, lazily


def require_boto3() -> Any:
    """Import and return boto3, or explain how to install it."""
    try:
        import boto3
    except ImportError:  # pragma: no cover - the dev environment always has boto3
        raise CloudDependencyError(
            f"boto3 is needed for `pygirder cloud`: {INSTALL_HINT}", code="ImportError"
        ) from None
    return boto3


_LOADER: list[Any] = []  # botocore's model loader, shared by every session we make


def session(config: CloudConfig) -> Any:
    """A boto3 Session for ``config``'s profile (or the default chain) and region.

    Each session has its own credentials and event hooks, but all share botocore's
    data loader: the service models (EC2's is megabytes of JSON) are read-only once
    parsed, so a process that makes many sessions parses them once.
    """
    boto3 = require_boto3()
    import botocore.session
    from botocore.exceptions import ProfileNotFound

    core = botocore.session.get_session()
    if _LOADER:
        core.register_component("data_loader", _LOADER[0])
    else:
        _LOADER.append(core.get_component("data_loader"))
    try:
        made = boto3.Session(
            botocore_session=core, profile_name=config.profile, region_name=config.region
        )
        core.get_scoped_config()  # resolve the profile now, not at the first call
        return made
    except ProfileNotFound:
        raise CredentialsError(
            f"AWS profile {config.profile!r} (from [cloud] profile) is not configured; "
            f"create it with `aws configure --profile {config.profile}` or "
            f"`aws configure sso --profile {config.profile}`, or remove `profile`",
            code="ProfileNotFound",
        ) from None


def client_config(*, connect_timeout: float = 10, read_timeout: float = 60) -> Any:
    """botocore Config for every client: our retries only, sane time-outs."""
    from botocore.config import Config

    return Config(
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        user_agent_extra="pygirder",
    )


def client(service: str, config: CloudConfig, region: str | None = None) -> Any:
    """A bare boto3 client for ``service`` (no pygirder retries: prefer :class:`Aws`)."""
    return session(config).client(
        service, region_name=region or config.region, config=client_config()
    )


# ------------------------------------------------------------------- the adaptor


class Aws:
    """Clients for one :class:`CloudConfig`, with retries and error translation.

    ``aws.call("ec2", "create_vpc", CidrBlock=...)`` calls a boto3 client method.
    Throttling and 5xx errors are retried (``max_attempts`` in all, exponential
    backoff from ``base_delay`` capped at ``max_delay``, with jitter); error codes in
    ``ignore`` return ``None``; anything else raises a :class:`CloudError`.
    ``sleep`` is injectable so tests of retries and waits do not sleep.
    """

    def __init__(
        self,
        config: CloudConfig,
        *,
        boto_session: Any = None,
        sleep: Callable[[float], None] = time.sleep,
        max_attempts: int = TRANSIENT_RETRY.attempts,
        base_delay: float = TRANSIENT_RETRY.base_delay,
        max_delay: float = TRANSIENT_RETRY.max_delay,
    ) -> None:
        self.config = config
        self.region = config.region
        self._session = boto_session
        self.sleep = sleep
        self.retry = RetryPolicy(max_attempts, base_delay, max_delay)
        self._clients: dict[tuple[str, str], Any] = {}
        self._account_id: str | None = None

    @property
    def boto_session(self) -> Any:
        if self._session is None:
            self._session = session(self.config)
        return self._session

    def client(self, service: str, region: str | None = None) -> Any:
        """The (cached) boto3 client of ``service`` in ``region`` (default: config's)."""
        key = (service, region or self.region)
        if key not in self._clients:
            self._clients[key] = self.boto_session.client(
                service, region_name=key[1], config=client_config()
            )
        return self._clients[key]

    def call(
        self,
        service: str,
        operation: str,
        *,
        region: str | None = None,
        retry: bool = True,
        ignore: tuple[str, ...] = (),
        **params: Any,
    ) -> Any:
        """Call ``client(service).<operation>(**params)``; see the class docstring."""
        from botocore.exceptions import BotoCoreError, ClientError

        api = self.client(service, region)
        method = getattr(api, operation)
        op_name = api.meta.method_to_api_mapping.get(operation, operation)
        attempt = 1
        while True:
            try:
                return method(**params)
            except ClientError as exc:
                error = exc.response.get("Error", {})
                code = str(error.get("Code", ""))
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if code in ignore:
                    return None
                if retry and attempt < self.retry.attempts and is_transient(code, status):
                    self.backoff(attempt)
                    attempt += 1
                    continue
                raise translate_client_error(
                    code=code,
                    message=str(error.get("Message", "")),
                    status=status,
                    service=service,
                    operation=op_name,
                    region=region or self.region,
                ) from exc
            except BotoCoreError as exc:
                raise translate_botocore_error(
                    exc, service=service, operation=op_name, profile=self.config.profile
                ) from exc

    def pages(
        self,
        service: str,
        operation: str,
        *,
        token: str = "NextToken",
        next_token: str | None = None,
        region: str | None = None,
        **params: Any,
    ) -> Iterator[dict[str, Any]]:
        """Every page of a paginated call, each page retried like :meth:`call`.

        ``token`` is the request parameter that asks for the next page and
        ``next_token`` the response field holding it (default: same name).
        """
        while True:
            page = self.call(service, operation, region=region, **params)
            yield page
            following = page.get(next_token or token)
            if not following:
                return
            params[token] = following

    def call_retrying(
        self,
        service: str,
        operation: str,
        *,
        codes: Iterable[str],
        policy: RetryPolicy,
        region: str | None = None,
        keep_going: Callable[[], bool] = lambda: True,
        on_retry: Callable[[CloudError, float, int], None] | None = None,
        **params: Any,
    ) -> Any:
        """:meth:`call`, also retried with ``policy`` while it fails with one of
        ``codes`` (and ``keep_going()`` says so); ``on_retry(error, delay, attempt)``
        hears of each retry before its sleep."""
        codes = frozenset(codes)
        attempt = 1
        while True:
            try:
                return self.call(service, operation, region=region, **params)
            except CloudError as exc:
                if exc.code not in codes or attempt >= policy.attempts or not keep_going():
                    raise
                delay = policy.delay(attempt)
                if on_retry is not None:
                    on_retry(exc, delay, attempt + 1)
                self.sleep(delay)
                attempt += 1

    def delete(
        self,
        service: str,
        operation: str,
        *,
        region: str | None = None,
        keep_going: Callable[[], bool] = lambda: True,
        on_retry: Callable[[CloudError, float, int], None] | None = None,
        **params: Any,
    ) -> Any:
        """A delete call: "already gone" is success (``None``), and a refusal while AWS
        still sees dependents (:data:`DEPENDENCY_CODES`) is retried with
        :data:`DEPENDENCY_RETRY`, the one policy for every delete pygirder makes."""
        try:
            return self.call_retrying(
                service,
                operation,
                region=region,
                codes=DEPENDENCY_CODES,
                policy=DEPENDENCY_RETRY,
                keep_going=keep_going,
                on_retry=on_retry,
                **params,
            )
        except CloudError as exc:
            if is_not_found(exc.code):
                return None
            raise

    def backoff(self, attempt: int) -> None:
        """Sleep before retry ``attempt`` (1-based) of a transient failure."""
        self.sleep(self.retry.delay(attempt))

    def wait_for(
        self,
        check: Callable[[], T | None],
        *,
        what: str,
        timeout: float,
        interval: float,
    ) -> T:
        """Poll ``check`` until it returns something truthy, at most ``timeout`` s.

        The bound is a number of polls (``timeout / interval``), so a test's fake
        ``sleep`` makes waits instant without making them endless.
        """
        polls = max(1, math.ceil(timeout / interval))
        for poll in range(polls):
            result = check()
            if result:
                return result
            if poll < polls - 1:
                self.sleep(interval)
        raise CloudTimeoutError(
            f"timed out after {timeout:.0f}s waiting for {what}; AWS may still be "
            "converging: run the command again in a minute",
            code="Timeout",
        )

    @property
    def account_id(self) -> str:
        """The 12-digit account of the credentials in use (asked once)."""
        if self._account_id is None:
            self._account_id = self.call("sts", "get_caller_identity")["Account"]
        return self._account_id


def is_transient(code: str, status: int | None) -> bool:
    """Throttling and server errors: the only failures worth retrying as they are."""
    if code in THROTTLING_CODES or code in SERVER_ERROR_CODES:
        return True
    return status is not None and status >= 500


def is_not_found(code: str) -> bool:
    """Error codes that mean "that resource does not exist (any more)"."""
    return "NotFound" in code or code.endswith(".Unavailable") or code in NOT_FOUND_CODES


def is_quota_code(code: str) -> bool:
    if code in QUOTA_CODES:
        return True
    # "VpcLimitExceeded", "AddressLimitExceeded", "LimitExceededException", ... but
    # "RequestLimitExceeded" is EC2's throttling.
    return "LimitExceeded" in code and code not in THROTTLING_CODES


def translate_client_error(
    *,
    code: str,
    message: str,
    status: int | None,
    service: str,
    operation: str,
    region: str,
) -> CloudError:
    """Turn one AWS error response into the most specific :class:`CloudError`."""
    where = f"{service}:{operation}"
    info = {"service": service, "operation": operation, "code": code, "status": status}
    short = _shorten(message)
    if code in EXPIRED_CODES:
        return CredentialsError(
            f"your AWS session has expired ({code} from {where}). Refresh it, e.g. "
            "`aws sso login` (with --profile if you use one), or get new temporary "
            "credentials, then run the command again.",
            **info,
        )
    if code in INVALID_CREDENTIAL_CODES:
        return CredentialsError(
            f"AWS rejected the credentials ({code} from {where}): the access key is "
            "unknown or inactive, or the secret does not match. Check which identity "
            "is in use with `aws sts get-caller-identity`.",
            **info,
        )
    if code in ACCESS_DENIED_CODES or (status == 403 and not code):
        action = _action_from_message(message) or iam_action(service, operation)
        return AccessDeniedError(
            f"access denied: the AWS identity in use is missing the permission "
            f"{action} (needed for {where}). {POLICY_HINT}; attach it to your user or "
            f"role. AWS said: {code}: {short}",
            action=action,
            **info,
        )
    if is_quota_code(code):
        return QuotaExceededError(
            f"an AWS quota stops {where} in {region}: {code}: {short}. Delete unused "
            f"resources of that kind or request a higher quota at "
            f"{QUOTAS_URL.format(region=region)}",
            **info,
        )
    return CloudError(f"{where} failed: {code or status}: {short}", **info)


def translate_botocore_error(
    exc: Exception, *, service: str, operation: str, profile: str | None
) -> CloudError:
    """Turn a botocore client-side failure (no credentials, no network) into an error."""
    from botocore import exceptions as bce

    info = {"service": service, "operation": operation, "code": type(exc).__name__}
    where = f"{service}:{operation}"
    if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError):
        return CredentialsError(
            "no AWS credentials found. pygirder uses the standard AWS chain and never "
            "stores keys: run `aws configure`, or `aws sso login --profile NAME` and set "
            '`profile = "NAME"` in [cloud] (or AWS_PROFILE), or export '
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.",
            **info,
        )
    sso_errors = tuple(
        getattr(bce, name)
        for name in ("TokenRetrievalError", "SSOTokenLoadError", "UnauthorizedSSOTokenError")
        if hasattr(bce, name)
    )
    if isinstance(exc, sso_errors):
        login = f"aws sso login --profile {profile}" if profile else "aws sso login"
        return CredentialsError(
            f"your AWS SSO session has expired or is missing: run `{login}`", **info
        )
    if isinstance(exc, bce.CredentialRetrievalError):
        return CredentialsError(f"could not obtain AWS credentials: {exc}", **info)
    if isinstance(exc, bce.EndpointConnectionError | bce.ConnectTimeoutError):
        return CloudError(
            f"cannot reach the AWS endpoint for {where}: {exc}. Check the network, the "
            "region, and AWS_ENDPOINT_URL if it is set.",
            **info,
        )
    return CloudError(f"{where} failed: {type(exc).__name__}: {exc}", **info)


_ACTION_RE = re.compile(r"perform:? ([a-z0-9-]+:[A-Za-z0-9*]+)")


def _action_from_message(message: str) -> str | None:
    match = _ACTION_RE.search(message)
    return match.group(1) if match else None


def _shorten(message: str, limit: int = 300) -> str:
    message = " ".join(message.split())
    if "Encoded authorization failure message" in message:
        message = message.split("Encoded authorization failure message")[0].strip()
        message += " (decode the full reason with `aws sts decode-authorization-message`)"
    return message if len(message) <= limit else message[: limit - 1] + "…"
