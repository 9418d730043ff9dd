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
     ├── ArtifactError              an artifact cannot be built, pushed, fetched or installed
     │    └── ArtifactIntegrityError  a fetched artifact's SHA-256 is not the pushed one
     ├── AgentError                 the instance agent cannot do its job (on the instance)
     ├── SimulatorError             the local data plane cannot do what was asked
     │    └── SimulatorTimeout      a wait for a simulated instance ran out (a TimeoutError)
     └── RehearsalError             a rehearsal step failed: .report holds the timeline
    ConfigError (core)
     └── CloudConfigError           ``[cloud]`` in pygirder.toml is missing or invalid

The modules that raise them re-export them (``pygirder.cloud.config.CloudConfigError``
and so on).  This module imports nothing but the core's errors, so every part of the
cloud (the instance code too) can raise and catch these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, PygirderError

if TYPE_CHECKING:
    from .account.model import Item
    from .sim.rehearse import RehearsalReport


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


class CloudConfigError(ConfigError):
    """``[cloud]`` in pygirder.toml is missing or invalid.

    ``problems`` holds one ``(key, value, what is allowed)`` triple per invalid key.
    """

    def __init__(self, message: str, *, problems: list[tuple[str, Any, str]] | None = None):
        super().__init__(message)
        self.problems = problems or []


class ArtifactError(PygirderError):
    """An artifact cannot be built, uploaded, downloaded or installed."""


class ArtifactIntegrityError(ArtifactError):
    """A downloaded artifact does not have the expected SHA-256: it was not installed."""

    def __init__(self, uri: str, expected: str, actual: str) -> None:
        super().__init__(
            f"artifact {uri} has sha256 {actual}, expected {expected}: refusing to install it "
            "(the object was changed after it was pushed, or the user-data names another "
            "artifact); push the artifact again and relaunch"
        )
        self.uri = uri
        self.expected = expected
        self.actual = actual


class AgentError(PygirderError):
    """The agent cannot do its job (metadata unreachable, service keeps crashing, ...)."""


class SimulatorError(PygirderError):
    """The data plane cannot do what was asked (endpoint unreachable, unknown instance, ...)."""


class SimulatorTimeout(SimulatorError, TimeoutError):
    """:meth:`Simulator.wait_for` ran out of time; the message holds the instance's logs."""


class RehearsalError(PygirderError):
    """A step of the rehearsal failed; the timeline so far is in ``report``."""

    def __init__(self, message: str, report: RehearsalReport) -> None:
        super().__init__(message)
        self.report = report
