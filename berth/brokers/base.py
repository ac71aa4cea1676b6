"""The broker interface (`Broker`): see berth/brokers/__init__.py."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# (instance id, provisioning request id) of every instance whose guest holds broker credentials.
LiveGuests = Callable[[], Iterable[tuple[str, str]]]


@dataclass(frozen=True)
class GuestConnection:
    """One open connection of a guest, as the broker sees it: the peer's address, and whether it
    uses TLS (None when the broker cannot tell)."""

    host: str
    tls: bool | None


def transport_of(connections: Iterable[GuestConnection]) -> str:
    """How a guest connects: ``tls``, ``plain``, ``mixed`` (some connections without TLS) or ``unknown``."""
    seen = {c.tls for c in connections}
    if seen == {True}:
        return "tls"
    if seen == {False}:
        return "plain"
    return "mixed" if {True, False} <= seen else "unknown"


def hosts_of(connections: Iterable[GuestConnection]) -> str:
    """The guest's address (several, comma-separated, if its connections come from more than one)."""
    return ",".join(sorted({c.host for c in connections}))


class Broker(ABC):
    """One broker, as the control plane and the guest agent use it."""

    name = "broker"

    # --- Guest queues: the taskmanager owns them ---------------------------------------------

    @abstractmethod
    def declare_guest_queue(self, instance_id: str) -> None:
        """Create ``guest.ID`` durably, before anything is sent to it. Idempotent."""

    @abstractmethod
    def guest_queue_exists(self, instance_id: str) -> bool:
        """Whether ``guest.ID`` was declared (and not removed since)."""

    @abstractmethod
    def purge_guest_queue(self, instance_id: str) -> int:
        """Drop the messages waiting in ``guest.ID`` (it stays declared); how many."""

    @abstractmethod
    def consumers(self, instance_id: str) -> int | None:
        """How many consumers ``guest.ID`` has, or None when this broker cannot tell."""

    @abstractmethod
    def queue_empty(self, queue: str) -> bool:
        """True when no message waits in ``queue`` (a control-plane queue such as ``taskmanager``)."""

    def nothing_ready(self, queue: str) -> bool:
        """True when no message of ``queue`` waits for a worker: what a step asks before it waits for a
        guest in its slot (messages a worker holds already, a retry counting down, do not count)."""
        return self.queue_empty(queue)

    @abstractmethod
    def remove_instance(self, instance_id: str, extra_task_ids: tuple[str, ...] = ()) -> int:
        """Remove everything of the instance on the broker and the result backend but its record:
        its queue, what its guest holds unacknowledged, its results (and those of
        ``extra_task_ids``), and every key its guest could have written; how many."""

    # --- Unacknowledged messages ---------------------------------------------------------------

    @abstractmethod
    def forget_guest_unacked(self, instance_id: str) -> None:
        """Drop what the guest took and never acknowledged (a failed instance runs nothing more)."""

    @abstractmethod
    def held_instances(self, nodes: Iterable[str]) -> set[str]:
        """Instances of which a taskmanager node (of ``nodes``) holds a message it has not acknowledged."""

    @abstractmethod
    def use_own_unacked(self, keys: Mapping[str, str]) -> None:
        """Make this process's consumer keep what it takes apart, under ``keys`` (per node, per guest)."""

    @abstractmethod
    def restore_unacked(self, app: Any, keys: Mapping[str, str]) -> int:
        """Put back on their queues the messages a consumer (named by ``keys``) took and never acknowledged."""

    @abstractmethod
    def consumer_steps(self) -> tuple[type, ...]:
        """Celery consumer steps a worker on this broker needs (added by the taskmanager and the agent)."""

    @abstractmethod
    def bind_guest(self, app: Any, instance_id: str) -> None:
        """Set up this process, a guest agent, to consume ``guest.ID`` only, with its own bookkeeping."""

    @abstractmethod
    def guest_connections(self, instance_id: str) -> list[GuestConnection]:
        """The open connections of the guest's user, to the broker and to the store beside it."""

    def release_waits(self, instance_id: str) -> int:
        """End the guest's blocking reads now, each answered "nothing" (no message is taken): a
        stopping agent waits for its read in flight before it closes. How many; 0 by default."""
        return 0

    # --- Guest credentials ---------------------------------------------------------------------

    @abstractmethod
    def mint_guest(self, instance_id: str, request_id: str) -> str:
        """Create (or reset) the guest's broker user: its own queue and answers, nothing else; its name."""

    @abstractmethod
    def revoke_guest(self, instance_id: str) -> bool:
        """Delete the guest's user and drop its connections; True if it existed."""

    @abstractmethod
    def restore_guests(self, live: LiveGuests, everywhere: bool = False) -> list[str]:
        """Mint again the users of ``live`` guests a broker lost (it restarted); their instance ids.

        Each server is checked when it restarted since the last call (and on the first call), or
        with ``everywhere``, always (after a broker error, say)."""

    @abstractmethod
    def guest_env(self, instance_id: str, request_id: str) -> dict[str, str]:
        """What the guest of this instance needs to connect, and nothing more (no key: see berth.keys)."""

    @abstractmethod
    def isolation_problem(self) -> str | None:
        """Why guests would not be isolated on this broker, or None."""

    @abstractmethod
    def limit_warnings(self) -> list[str]:
        """What this broker lacks of the limits a broker serving guests should have."""
