"""Provisioning as a Celery chain: create_queue -> boot_guest -> ping_guest -> send_prepare -> verify.

    from workflows import provision_chain
    result = provision_chain("db-1", datastore="redis",
                             users=[{"name": "app", "password": "s3cret-pass"}],
                             databases=["app"]).apply_async()
    result.get(timeout=120)   # {'instance_id': 'db-1', 'status': 'ACTIVE', ...} or raises

The same chain starts from a shell with ``celery -A tasks call workflows.provision`` and from
Flower's send-task API (see `workflows.tasks.provision`), or with ``python -m workflows``.
"""

from __future__ import annotations

import uuid
from typing import Any

from celery import chain

from berth.ids import step_task_id
from tasks.taskmanager import boot_guest, create_queue, ping_guest, send_prepare, validated, verify

STEPS = ("create_queue", "boot_guest", "ping_guest", "send_prepare", "verify")


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
        boot_guest.si(iid).set(task_id=step_id("boot_guest")),
        ping_guest.si(iid).set(task_id=step_id("ping_guest")),
        send_prepare.si(iid).set(task_id=step_id("send_prepare")),
        verify.si(iid).set(task_id=step_id("verify")),
    )


__all__ = ["STEPS", "provision_chain"]
