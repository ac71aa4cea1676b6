"""The guest agent's tasks: guest.ping, guest.prepare, guest.get_status.

Each checks that the message is for this guest's instance; prepare re-validates its
arguments (a guest trusts nothing it did not check) and is idempotent by prepare id.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Task

from berth import __version__
from berth.paths import guest_dir
from berth.spec import InvalidField, check_config, check_databases, check_users
from guest import app
from guest.datastores import get_manager
from guest.errors import InvalidMessage, PrepareError, WrongInstance
from guest.journal import Journal

log = logging.getLogger("berth.guest")


def own_instance(instance_id: object) -> str:
    """This guest's instance id, after checking the message names the same one."""
    mine = app.conf.berth_instance_id
    if not mine:
        raise WrongInstance("this guest was started without --instance-id")
    if instance_id != mine:
        log.warning("refused a message for instance %r: this guest serves %s", instance_id, mine)
        raise WrongInstance(f"message for instance {instance_id!r} reached guest {mine}")
    return str(mine)


@app.task(name="guest.ping")
def ping(instance_id: str) -> dict[str, Any]:
    """Proves guest.ID is consumed by this instance's agent (a pidbox ping would not)."""
    return {"instance_id": own_instance(instance_id), "version": __version__, "pid": os.getpid()}


@app.task(name="guest.prepare", bind=True, acks_late=True, reject_on_worker_lost=True)
def prepare(self: Task, instance_id: str, datastore: str, users: list[dict[str, str]],
            databases: list[str], config: dict[str, Any]) -> dict[str, Any]:
    """Set up the datastore once per prepare id, however often the message arrives.

    The id carries the provisioning request, so a new provisioning that reuses an instance
    id is a new prepare, while a redelivery of the same message is not.
    """
    own = own_instance(instance_id)
    prepare_id = str(self.request.id)
    try:
        checked_users = check_users(users)
        check_databases(databases)
        manager = get_manager(datastore, guest_dir(own))
        check_config(datastore, config)
    except InvalidField as exc:
        raise InvalidMessage(str(exc)) from None
    journal = Journal(guest_dir(own))
    deliveries = journal.delivered(prepare_id)
    done = journal.result(prepare_id)
    if done is not None:
        log.info("prepare %s already applied: delivery %d applies nothing", prepare_id, deliveries)
        return {**done, "deliveries": deliveries}
    plain_users = [{"name": u.name, "password": u.password} for u in checked_users]
    try:
        connection = manager.prepare(plain_users, list(databases), dict(config))
    except PrepareError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure becomes PREPARE_FAILED, never a crash
        # Name the failure without its message: it could quote an argument.
        raise PrepareError(f"{datastore} prepare failed: {type(exc).__name__}") from None
    result = {"instance_id": own, "prepare_id": prepare_id, "connection": connection}
    journal.applied(prepare_id, result)
    log.info("prepare %s applied (delivery %d)", prepare_id, deliveries)
    return {**result, "deliveries": deliveries}


@app.task(name="guest.get_status")
def get_status(instance_id: str) -> dict[str, Any]:
    own = own_instance(instance_id)
    journal = Journal(guest_dir(own))
    data = journal.read()
    status: dict[str, Any] = {"instance_id": own, "version": __version__, "prepared": bool(data["results"])}
    for result in data["results"].values():
        status["datastore"] = get_manager(result["connection"]["datastore"], guest_dir(own)).status()
    return status
