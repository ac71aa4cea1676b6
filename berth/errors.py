"""The taskmanager's errors: one tree, rooted at ProvisioningError.

Each keeps its constructor arguments in ``args`` so that Celery can rebuild it from a
stored result (``AsyncResult.get()`` raises the same class in the caller).
"""

from __future__ import annotations


class ProvisioningError(Exception):
    """Root of every error the taskmanager raises on purpose."""


class InvalidRequest(ProvisioningError, ValueError):
    """A request field is malformed; nothing was created."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(field, problem)
        self.field = field
        self.problem = problem

    def __str__(self) -> str:
        return f"invalid {self.field}: {self.problem}"


class InvalidInstanceId(InvalidRequest):
    def __init__(self, field: str = "instance_id", problem: str = "malformed") -> None:
        super().__init__(field, problem)


class InstanceExists(ProvisioningError):
    """Another provisioning already owns this instance id."""


class RequestFinished(ProvisioningError):
    """A late redelivery of a request whose instance was deleted since: it changes nothing."""


class InstanceNotFound(ProvisioningError):
    pass


class InstanceNotBuilding(ProvisioningError):
    """A chain step found its instance no longer in BUILD (failed or deleted): the chain stops."""


class InstanceNotDeleting(ProvisioningError):
    """A delete step found its instance not (or no longer) being deleted."""


class BrokerUnavailable(ProvisioningError):
    pass


class QueueMissing(ProvisioningError):
    """A message was about to be sent to a guest queue that create_queue never declared."""


class BootFailed(ProvisioningError):
    pass


class GuestUnreachable(ProvisioningError):
    pass


class PrepareFailed(ProvisioningError):
    pass


class PrepareTimeout(ProvisioningError):
    pass


def from_invalid_field(exc: ValueError) -> InvalidRequest:
    """Map a validation failure onto the taskmanager's tree (the instance id gets its own class)."""
    field = getattr(exc, "field", "request")
    problem = getattr(exc, "problem", str(exc))
    cls = InvalidInstanceId if field == "instance_id" else InvalidRequest
    return cls(field, problem)


class StillWaiting(ProvisioningError):
    """Not an error: why a step retries (shown with its RETRY state in Flower and the log)."""


class InstanceNotServing(ProvisioningError):
    """The guest API needs an ACTIVE, SHUTDOWN or UNKNOWN instance."""


class GuestTimeout(ProvisioningError):
    """The guest did not answer a call within its timeout."""


class GuestError(ProvisioningError):
    """The guest answered a call with an error (it names what was wrong)."""
