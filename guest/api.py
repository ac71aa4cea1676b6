"""The guest API beyond prepare: ``guest.get_status`` (guest/agent.py), ``guest.restart``,
``guest.list_databases``, ``guest.create_database``, ``guest.delete_database``,
``guest.list_users``, ``guest.create_user`` and ``guest.delete_user`` (see berth/guestapi.py).

Each checks that the message is for this guest and re-checks its arguments. A password
arrives sealed with this guest's key; a plaintext one is refused. An operation that changes
the datastore is applied once per message: a message whose result was stored is spent
(guest/authn.py), and one that ran while the guest died before answering runs again in
"again" mode, where what is already done is not an error (`OpsJournal`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from celery import Task

import guest.heartbeat as heartbeat
from berth.errors import DatastoreError, InvalidField, InvalidMessage, SealError
from berth.guestapi import OPERATIONS, check_arguments
from berth.paths import guest_dir, replace_file
from guest.agent import own_instance
from guest.celery_app import app
from guest.datastores import get_manager
from guest.identity import identity
from guest.state import prepared_datastore

# Ids of operations begun, kept for the redeliveries of the last few.
KEEP_OPS = 256


class OpsJournal:
    """Which operation messages this guest began: one that comes again ran before and died."""

    def __init__(self, home: Path) -> None:
        self.path = home / "ops.json"

    def begin(self, task_id: str) -> bool:
        """Note the operation as begun; True if it had begun before (a redelivery)."""
        begun: list[str] = json.loads(self.path.read_text()) if self.path.exists() else []
        if task_id in begun:
            return True
        replace_file(self.path, json.dumps([*begun, task_id][-KEEP_OPS:]), mode=0o600)
        return False


def _run(task: Task, name: str, instance_id: str, arguments: dict[str, Any]) -> Any:
    own = own_instance(instance_id)
    if "password" in arguments:
        try:
            arguments = {**arguments, "password": identity().key.unseal(arguments["password"])}
        except SealError:
            raise InvalidMessage("password: not sealed for this guest") from None
    try:
        checked = check_arguments(name, arguments)
    except InvalidField as exc:
        raise InvalidMessage(str(exc)) from None
    datastore = prepared_datastore(own)
    if datastore is None:
        raise DatastoreError("no datastore yet: prepare has not been applied on this guest")
    manager = get_manager(datastore, guest_dir(own))
    if name == "restart":
        status = manager.restart()
        heartbeat.soon()
        return status
    if not OPERATIONS[name].changes:
        return getattr(manager, name)(**checked)
    again = OpsJournal(guest_dir(own)).begin(str(task.request.id))
    return getattr(manager, name)(**checked, again=again)


@app.task(name="guest.restart", bind=True)
def restart(self: Task, instance_id: str) -> Any:
    return _run(self, "restart", instance_id, {})


@app.task(name="guest.list_databases", bind=True)
def list_databases(self: Task, instance_id: str) -> Any:
    return _run(self, "list_databases", instance_id, {})


@app.task(name="guest.create_database", bind=True)
def create_database(self: Task, instance_id: str, name: str) -> Any:
    return _run(self, "create_database", instance_id, {"name": name})


@app.task(name="guest.delete_database", bind=True)
def delete_database(self: Task, instance_id: str, name: str) -> Any:
    return _run(self, "delete_database", instance_id, {"name": name})


@app.task(name="guest.list_users", bind=True)
def list_users(self: Task, instance_id: str) -> Any:
    return _run(self, "list_users", instance_id, {})


@app.task(name="guest.create_user", bind=True)
def create_user(self: Task, instance_id: str, name: str, password: str,
                databases: list[str] | None = None) -> Any:
    return _run(self, "create_user", instance_id, {"name": name, "password": password, "databases": databases})


@app.task(name="guest.delete_user", bind=True)
def delete_user(self: Task, instance_id: str, name: str) -> Any:
    return _run(self, "delete_user", instance_id, {"name": name})
