"""The guest agent's tasks: guest.ping, guest.prepare, guest.get_status, guest.shutdown.

Each checks that the message is for this guest's instance; prepare re-validates its
arguments (a guest trusts nothing it did not check) and is idempotent by prepare id.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from celery import Task
from celery.signals import task_failure, task_success

import guest.deadletters as deadletters
import guest.heartbeat as heartbeat
from berth import __version__
from berth.config import store_url
from berth.errors import InvalidField, InvalidMessage, PrepareError, SealError, WrongInstance
from berth.paths import guest_dir
from berth.spec import check_config, check_databases, check_users
from berth.tls import redis_from_url
from guest.authn import expiry_epoch
from guest.celery_app import app
from guest.datastores import get_manager
from guest.identity import identity
from guest.journal import Journal
from guest.state import datastore_status, prepared_datastore

log = logging.getLogger("berth.guest")
# A prepare delivered this often without ever finishing kills its guest each time: dead-letter it.
MAX_PREPARE_DELIVERIES = 5
# A prepare counts only if it finishes this long before its deadline: its answer must reach the
# taskmanager before the taskmanager gives up on it (PREPARE_TIMEOUT) at the deadline.
COMMIT_MARGIN_S = 0.25


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
    id is a new prepare, while a redelivery of the same message is not. A prepare that
    finishes after its deadline (the guest was frozen, say) is undone: the taskmanager has
    failed the instance by then and nothing of it may stay behind.
    """
    own = own_instance(instance_id)
    prepare_id = str(self.request.id)
    try:
        checked_users = check_users(_unsealed(users))
        check_databases(databases)
        manager = get_manager(datastore, guest_dir(own))
        check_config(datastore, config)
    except InvalidField as exc:
        raise InvalidMessage(str(exc)) from None
    journal = Journal(guest_dir(own))
    deliveries = journal.delivered(prepare_id)
    if journal.result(prepare_id) is not None:
        log.info("prepare %s already applied: delivery %d applies nothing", prepare_id, deliveries)
        return _with_counts(journal, prepare_id)
    if deliveries > MAX_PREPARE_DELIVERIES:
        # It killed this guest every time it ran: stop the loop, keep it for the operator.
        _dead_letter(own, "poison", f"delivered {deliveries} times without finishing", self.request)
        raise PrepareError(f"prepare {prepare_id} was delivered {deliveries} times without finishing; "
                           "dead-lettered")
    plain_users = [{"name": u.name, "password": u.password} for u in checked_users]
    try:
        connection = manager.prepare(plain_users, list(databases), dict(config))
    except PrepareError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure becomes PREPARE_FAILED, never a crash
        # Name the failure without its message: it could quote an argument.
        raise PrepareError(f"{datastore} prepare failed: {type(exc).__name__}") from None
    late_by = _late_by(self.request.expires)
    if late_by is not None:
        manager.discard()
        journal.rolled_back(prepare_id)
        log.warning("prepare %s finished %.1f s after its deadline: rolled back", prepare_id, late_by)
        raise PrepareError(f"prepare finished {late_by:.1f} s after its deadline and was rolled back")
    journal.applied(prepare_id, {"instance_id": own, "prepare_id": prepare_id, "connection": connection})
    log.info("prepare %s applied (delivery %d)", prepare_id, deliveries)
    heartbeat.soon()
    return _with_counts(journal, prepare_id)


def _unsealed(users: Any) -> Any:
    """Users with the passwords the taskmanager sealed for this guest opened; only it can.

    A plaintext password is refused: the taskmanager never sends one, so it was not the sender.
    """
    if not isinstance(users, list):
        return users
    key = identity().key
    opened = []
    for user in users:
        if isinstance(user, dict) and "password" in user:
            try:
                user = {**user, "password": key.unseal(user["password"])}
            except SealError:
                raise InvalidMessage(f"users: the password of {user.get('name')!r} is not sealed for this "
                                     "guest") from None
        opened.append(user)
    return opened


@task_success.connect
def spend_on_success(sender: Any = None, **_: Any) -> None:
    _spend(sender)


@task_failure.connect
def spend_on_failure(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    _spend(sender)


def _spend(task: Any) -> None:
    """A message that ran, its result stored, is spent: the same id again is a replay (guest/authn.py).

    Celery sends these signals after it stored the result; a result it could not store raises
    before them, and the message, not spent, comes back and runs again.
    """
    request = getattr(task, "request", None)
    task_id = getattr(request, "id", None)
    if not task_id:
        return
    expires_at = expiry_epoch(getattr(request, "expires", None))
    identity().spent.spend(task_id, expires_at if expires_at is not None else time.time() + 86400)


def _with_counts(journal: Journal, prepare_id: str) -> dict[str, Any]:
    """The recorded result with the audit counts (delivered N times, applied once)."""
    result = journal.result(prepare_id)
    assert result is not None
    return {**result, **journal.counts(prepare_id)}


def _late_by(expires: Any) -> float | None:
    """Seconds past the message's expiry (less the commit margin), or None if in time."""
    expires_at = expiry_epoch(expires)
    if expires_at is None:
        return None
    late = time.time() - (expires_at - COMMIT_MARGIN_S)
    return late if late > 0 else None


def _dead_letter(instance_id: str, reason: str, error: str, request: Any) -> None:

    entry = {"reason": reason, "error": error, "task": request.task, "id": request.id,
             "content_type": None, "size": None, "received_at": time.time()}
    try:
        deadletters.push(_broker(), instance_id, entry)
    except Exception:  # noqa: BLE001 - the log keeps it when the broker cannot
        log.exception("could not dead-letter %s", request.id)


def _broker() -> Any:
    return redis_from_url(store_url(app.conf.broker_url, app.conf.result_backend), socket_connect_timeout=2.0)


@app.task(name="guest.shutdown", bind=True)
def shutdown(self: Task, instance_id: str, stop_agent: bool = True) -> dict[str, Any]:
    """Stop the datastore (delete asks for this), report the audit counts, then exit.

    The agent stops itself after the answer is stored and the message acknowledged, so a
    guest started by hand (`--boot none`) goes away with its instance too.
    """
    own = own_instance(instance_id)
    journal = Journal(guest_dir(own))
    data = journal.read()
    stores = {r["connection"]["datastore"] for r in data["results"].values()}
    datastores = [get_manager(name, guest_dir(own)).shutdown() for name in sorted(stores)]
    totals = {name: sum(int(n) for n in data[name].values()) for name in ("deliveries", "applied", "rolled_back")}
    if stop_agent:
        # Warm shutdown: the worker finishes this task (result, ack) before it exits.
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
    log.info("datastore shut down for delete: %s", datastores)
    return {"instance_id": own, "datastores": datastores, **totals}


@app.task(name="guest.get_status")
def get_status(instance_id: str) -> dict[str, Any]:
    own = own_instance(instance_id)
    status: dict[str, Any] = {"instance_id": own, "version": __version__, "pid": os.getpid(),
                              "prepared": prepared_datastore(own) is not None}
    datastore = datastore_status(own)
    if datastore is not None:
        status["datastore"] = datastore
    return status
