"""Every error the cloud's operator code raises, in one tree.

    PygirderError
     └── CloudError                 an AWS call failed: .service, .operation, .code
          ├── CloudDependencyError  boto3 is not installed (also an ImportError)
          ├── CredentialsError      no credentials, an expired token, a rejected key
          ├── AccessDeniedError     the identity lacks a permission: .action names it
          ├── QuotaExceededError    an account quota (VPCs, addresses, ...) is reached
          ├── CloudTimeoutError     a bounded wait ran out (also a TimeoutError)
          ├── ResourceConflictError pygirder's names are held by what it did not create
          ├── FleetAliveError       teardown refused: fleet instances are alive
          ├── NotSetUpError         the account setup is missing: .missing names it
          ├── ImageError            an image could not be built, found or deleted
          └── FleetError            a fleet command cannot do what was asked
               ├── NoFleetError       no fleet (or no single fleet) matches
               └── FleetNotReadyError fewer instances became ready than required

Errors that are not about AWS calls live next to their concept and derive from
:class:`~pygirder.errors.PygirderError` directly: ``CloudConfigError`` (a
``ConfigError``, in :mod:`.config`), ``ArtifactError`` (:mod:`.artifacts`),
``AgentError`` (on the instance), ``RehearsalError`` and ``SimulatorError`` (the
simulator).  This module imports nothing but the core's errors, so every part of
the cloud (the instance code too) can raise and catch these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import PygirderError

if TYPE_CHECKING:
    from .account.model import Item


class CloudError(PygirderError):
    """An AWS call failed.  ``code`` is AWS's error code ("" when there was none)."""

    def __init__(
        self,
        message: str,
        *,
        service: str = "",
        operation: str = "",
        code: str = "",
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.service = service
        self.operation = operation
        self.code = code
        self.status = status


class CloudDependencyError(CloudError, ImportError):
    """boto3 is needed for ``pygirder cloud`` and is not installed."""


class CredentialsError(CloudError):
    """There are no usable AWS credentials: none found, expired, or rejected."""


class AccessDeniedError(CloudError):
    """The AWS identity lacks a permission; ``action`` is the IAM action to grant."""

    def __init__(self, message: str, *, action: str = "", **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.action = action


class QuotaExceededError(CloudError):
    """An AWS account quota (limit) stops pygirder from creating a resource."""


class CloudTimeoutError(CloudError, TimeoutError):
    """A bounded wait for AWS to converge (propagation, a state change) ran out."""


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


class ImageError(CloudError):
    """An image could not be built, found or deleted; the message says what to do."""


class FleetError(CloudError):
    """A fleet command cannot do what was asked (see the message for the next step)."""


class NoFleetError(FleetError):
    """No fleet (or no single fleet) matches: the message lists what exists."""


class FleetNotReadyError(FleetError):
    """``up`` got fewer ready instances than required; the fleet was removed.

    ``ready`` and ``requested`` map each role to its counts; ``details`` holds what
    the instances that failed announced.
    """

    def __init__(
        self,
        message: str,
        *,
        fleet: str,
        ready: dict[str, int],
        requested: dict[str, int],
        details: list[str],
    ) -> None:
        super().__init__(message, code="FleetNotReady")
        self.fleet = fleet
        self.ready = ready
        self.requested = requested
        self.details = details
