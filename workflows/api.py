"""The guest API from Python (in a control-plane process: it needs the master key).

    from workflows import api
    api.list_users("db-1")                                     # [{'name': 'app', 'databases': ['app']}]
    api.create_database("db-1", "reports")
    api.create_user("db-1", "analyst", password="an4lyst-pass", databases=["reports"])
    api.restart("db-1", cast=True)                             # {'guest_task_id': ...}: does not wait

Each is a call (waits at most ``timeout_s``, default ``berth_guest_call_timeout_s``) or, with
``cast=True``, a cast. Errors: InvalidRequest (nothing sent), InstanceNotFound,
InstanceNotServing, GuestUnreachable (stale heartbeat and no answer to a ping: nothing sent),
GuestTimeout, GuestError (the guest's own error), all from berth.errors.
"""

from __future__ import annotations

from typing import Any

from tasks.guestapi import call


def get_status(instance_id: str, *, timeout_s: float | None = None, cast: bool = False) -> Any:
    return call(instance_id, "get_status", timeout_s=timeout_s, cast=cast)


def restart(instance_id: str, *, timeout_s: float | None = None, cast: bool = False) -> Any:
    return call(instance_id, "restart", timeout_s=timeout_s, cast=cast)


def list_databases(instance_id: str, *, timeout_s: float | None = None, cast: bool = False) -> Any:
    return call(instance_id, "list_databases", timeout_s=timeout_s, cast=cast)


def create_database(instance_id: str, name: str, *, timeout_s: float | None = None, cast: bool = False) -> Any:
    return call(instance_id, "create_database", {"name": name}, timeout_s=timeout_s, cast=cast)


def delete_database(instance_id: str, name: str, *, timeout_s: float | None = None, cast: bool = False) -> Any:
    return call(instance_id, "delete_database", {"name": name}, timeout_s=timeout_s, cast=cast)


def list_users(instance_id: str, *, timeout_s: float | None = None, cast: bool = False) -> Any:
    return call(instance_id, "list_users", timeout_s=timeout_s, cast=cast)


def create_user(instance_id: str, name: str, *, password: str, databases: list[str] | None = None,
                timeout_s: float | None = None, cast: bool = False) -> Any:
    arguments: dict[str, Any] = {"name": name, "password": password}
    if databases is not None:
        arguments["databases"] = databases
    return call(instance_id, "create_user", arguments, timeout_s=timeout_s, cast=cast)


def delete_user(instance_id: str, name: str, *, timeout_s: float | None = None, cast: bool = False) -> Any:
    return call(instance_id, "delete_user", {"name": name}, timeout_s=timeout_s, cast=cast)
