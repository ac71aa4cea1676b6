"""Datastore managers: what prepare sets up inside the guest.

A manager's prepare must be safe to repeat: a guest killed half-way through gets the
same prepare again and finishes the job without doing any part twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from guest.errors import InvalidMessage


class Manager(Protocol):
    name: str

    def __init__(self, home: Path) -> None: ...

    def prepare(self, users: list[dict[str, str]], databases: list[str], config: dict[str, Any]) -> dict[str, Any]:
        """Set the datastore up; return how to connect (never a password)."""
        ...

    def status(self) -> dict[str, Any]:
        ...

    def shutdown(self) -> dict[str, Any]:
        """Stop the datastore (delete asks for this); return its status."""
        ...

    def discard(self) -> None:
        """Undo a prepare that finished too late: nothing of it may remain."""
        ...


def get_manager(datastore: str, home: Path) -> Manager:
    from guest.datastores.noop import NoopManager
    from guest.datastores.redis import RedisManager

    managers: dict[str, type[Manager]] = {"redis": RedisManager, "noop": NoopManager}
    if datastore not in managers:
        raise InvalidMessage(f"unknown datastore {datastore!r}")
    return managers[datastore](home)
