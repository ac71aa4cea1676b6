"""Provisioning as a Celery chain: create_queue -> ping_guest -> send_prepare -> verify.

    from workflows import provision_chain
    result = provision_chain("db-1", datastore="redis",
                             users=[{"name": "app", "password": "s3cret-pass"}],
                             databases=["app"]).apply_async()
    result.get(timeout=120)   # {'instance_id': 'db-1', 'status': 'ACTIVE', ...} or raises

The same chain starts from a shell with ``celery -A tasks call workflows.provision`` and from
Flower's send-task API (see `workflows.tasks.provision`), or with ``python -m workflows``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from amqp.exceptions import MessageNacked
from celery import chain

from berth.errors import InstanceNotFound, InvalidField, from_invalid_field
from berth.ids import DELETE_STEPS, PROVISION_STEPS, step_task_id
from berth.records import DELETABLE, InstanceRecord, Status
from berth.spec import check_instance_id
from tasks import secrets
from tasks.celery_app import app
from tasks.deletion import remove_instance, shutdown_guest
from tasks.runtime import records, redis_client
from tasks.taskmanager import (
    REQUEST_FIELDS,
    create_queue,
    ping_guest,
    register,
    send_prepare,
    validated,
    verify,
)

STEPS = PROVISION_STEPS


def provision_chain(instance_id: str, *, request_id: str | None = None, **request: Any) -> chain:
    """The provisioning chain for one instance; raises InvalidRequest before anything is sent.

    Keyword arguments: datastore ('redis' or 'noop'), boot ('local' or 'none'), boot_delay_s,
    ping_deadline_s, prepare_deadline_s, users ([{'name', 'password'}]), databases, config.
    Each call is a new request (``request_id``): provisioning an id already in use is refused.
    Step task ids are ``<instance id>.<step>.<request>``: an instance's results are its own,
    and a refused second request cannot overwrite the first one's.
    """
    spec = validated(instance_id, **request).task_kwargs()
    iid = spec.pop("instance_id")
    rid = request_id or uuid.uuid4().hex

    def step_id(step: str) -> str:
        return step_task_id(iid, rid, step)

    return chain(
        create_queue.si(iid, request_id=rid, **spec).set(task_id=step_id("create_queue")),
        ping_guest.si(iid).set(task_id=step_id("ping_guest")),
        send_prepare.si(iid).set(task_id=step_id("send_prepare")),
        verify.si(iid).set(task_id=step_id("verify")),
    )


def submit(instance_id: str, **request: Any) -> str:
    """Provision durably: record the request first, then send it; return the request id.

    Raises InvalidRequest (nothing created), InstanceExists, or kombu's OperationalError when
    the broker is down (the record is taken back: nothing half-created stays). Once this
    returns, the request survives any crash: were its message lost, the taskmanager's
    reconciler finds the NEW record and starts the chain (see `tasks.reconcile`).
    """
    spec = validated(instance_id, **request)
    request_id = str(uuid.uuid4())
    register(spec, request_id)
    try:
        send_request("workflows.provision", [spec.instance_id], request, request_id)
    except Exception:
        records().forget(spec.instance_id, request_id)
        secrets.drop(redis_client(), spec.instance_id)
        raise
    return request_id


# A publish the broker refused (a quorum queue electing a new leader after losing a node) is sent
# again, with this much backoff, for this long: the broker answered, so it is up.
NACK_RETRY_S = (0.1, 1.0)
NACK_DEADLINE_S = 30.0


def nacked(exc: BaseException | None) -> bool:
    """Whether ``exc``, or what caused it, is the broker refusing a publish (basic.nack)."""
    while exc is not None:
        if isinstance(exc, MessageNacked):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def send_request(task: str, args: list[Any], kwargs: dict[str, Any], request_id: str) -> None:
    """Publish a request (`workflows.provision`, `workflows.delete`; workflows/tasks.py), its id the request's.

    A publish the broker nacked did not reach the queue: it is sent again, with the same id, until
    NACK_DEADLINE_S (a request runs once whatever arrives twice). Any other error is raised at once.
    """
    deadline, delay = time.monotonic() + NACK_DEADLINE_S, NACK_RETRY_S[0]
    while True:
        try:
            app.send_task(task, args=args, kwargs=kwargs, task_id=request_id)
            return
        except Exception as exc:
            if not nacked(exc) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(2 * delay, NACK_RETRY_S[1])




def mark_deleting(instance_id: str, request_id: str) -> Status | None:
    """Record a delete request: DELETING, with its id, watched by the reconciler from now on.

    Returns DELETED when there is nothing to delete, DELETING once recorded, None when the status
    changed under us (a step finished): read it again and decide again. Raises InstanceNotFound.
    """
    record = records().get(instance_id)
    if record is None:
        raise InstanceNotFound(f"no instance {instance_id}")
    if record.status is Status.DELETED:
        return Status.DELETED
    if record.status is Status.DELETING:
        if record.get("delete_request_id") != request_id:
            records().update(instance_id, delete_request_id=request_id)
    elif not records().transition(instance_id, Status.DELETING, DELETABLE, "delete", deleted_from=record.status,
                                  delete_requested_at=time.time(), delete_request_id=request_id):
        return None
    records().step_ran(instance_id)  # the reconciler watches the delete chain from here on
    return Status.DELETING


def submit_delete(instance_id: str) -> str:
    """Delete durably: record the request (DELETING) first, then send it; return the request id.

    Once this returns, the delete survives any crash: were its message lost, the reconciler
    finds the DELETING record and runs the delete chain. Raises InvalidInstanceId,
    InstanceNotFound, or kombu's OperationalError when the broker is down (if the record was
    written before the publish failed, the delete still goes on).
    """
    instance_id = validated_id(instance_id)
    request_id = str(uuid.uuid4())
    for _ in range(20):
        status = mark_deleting(instance_id, request_id)
        if status is not None:
            break
        time.sleep(0.05)
    if status is Status.DELETED:
        return request_id
    send_request("workflows.delete", [instance_id], {}, request_id)
    return request_id


def validated_id(instance_id: object) -> str:

    try:
        return check_instance_id(instance_id)
    except InvalidField as exc:
        raise from_invalid_field(exc) from exc


def delete_chain(instance_id: str, request_id: str) -> chain:
    """shutdown_guest -> remove_instance, with ids ``<instance id>.<step>.<delete request>``."""
    return chain(
        shutdown_guest.si(instance_id).set(task_id=step_task_id(instance_id, request_id, "shutdown_guest")),
        remove_instance.si(instance_id).set(task_id=step_task_id(instance_id, request_id, "remove_instance")),
    )


def resume_chain(record: InstanceRecord, step: str) -> chain:
    """The rest of the instance's chain from ``step`` on, with the chain's own task ids."""
    if step == "create_queue":
        request = {**{k: record[k] for k in REQUEST_FIELDS if k not in ("users",)},
                   "users": [{"name": n, "password": p} for n, p in secrets.load(redis_client(),
                                                                              record.instance_id).items()]}
        return provision_chain(record.instance_id, request_id=record["request_id"], **request)
    names: tuple[str, ...]
    if record.status is Status.DELETING:
        whole = delete_chain(record.instance_id, record["delete_request_id"])
        names = DELETE_STEPS
    else:
        iid, rid = record.instance_id, record["request_id"]
        tasks = {"ping_guest": ping_guest, "send_prepare": send_prepare, "verify": verify}
        whole = chain(*(tasks[name].si(iid).set(task_id=step_task_id(iid, rid, name)) for name in STEPS[1:]))
        names = STEPS[1:]
    return chain(*whole.tasks[names.index(step):])


__all__ = ["STEPS", "delete_chain", "mark_deleting", "provision_chain", "resume_chain", "submit", "submit_delete"]
