"""Datastore managers: what prepare sets up inside the guest.

A manager's prepare must be safe to repeat: a guest killed half-way through gets the
same prepare again and finishes the job without doing any part twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from berth.errors import InvalidMessage


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

    # The guest API (guest/api.py). ``again``: this message ran before and the guest died before
    # answering, so what it did may already be done; do it again without calling that an error.
    def restart(self) -> dict[str, Any]: ...

    def list_databases(self) -> list[str]: ...

    def create_database(self, name: str, *, again: bool = False) -> dict[str, Any]: ...

    def delete_database(self, name: str, *, again: bool = False) -> dict[str, Any]: ...

    def list_users(self) -> list[dict[str, Any]]: ...

    def create_user(self, name: str, password: str, databases: list[str] | None, *,
                    again: bool = False) -> dict[str, Any]: ...

    def delete_user(self, name: str, *, again: bool = False) -> dict[str, Any]: ...


def get_manager(datastore: str, home: Path) -> Manager:
    # Loaded when a datastore is first needed, not at the agent's start: the start to the first
    # pong is a benchmark target (guest footprint, BENCHMARKS.md), and a guest has no datastore
    # to manage before its prepare.
    from guest.datastores.noop import NoopManager
    from guest.datastores.redis import RedisManager

    managers: dict[str, type[Manager]] = {"redis": RedisManager, "noop": NoopManager}
    if datastore not in managers:
        raise InvalidMessage(f"unknown datastore {datastore!r}")
    return managers[datastore](home)
