"""`workflows.provision` and `workflows.delete`, the tasks that start the chains, and the guest API
(`workflows.list_users`, ...): for `celery call`, Flower's API and the command line."""

from __future__ import annotations

from typing import Any

from celery import Task

from berth.errors import InstanceExists, InvalidRequest, ProvisioningError, RequestFinished
from berth.guestapi import OPERATIONS, operation
from berth.ids import RESUME_TASK
from berth.records import Status
from tasks import app, guestapi
from tasks.reconcile import next_step
from tasks.runtime import records
from workflows import delete_chain, mark_deleting, provision_chain, resume_chain, validated_id


@app.task(name="workflows.provision", bind=True, throws=(ProvisioningError,))
def provision(self: Task, instance_id: str, **request: Any) -> dict[str, Any]:
    """Validate, refuse an id already in use, then start the provisioning chain.

    Returns at once with the id of the chain's last task; follow the instance with
    ``python -m workflows show ID`` or in Flower.
    """
    if records().is_finished(self.request.id):
        raise RequestFinished(f"request {self.request.id} for {instance_id} finished long ago "
                              "(its instance was deleted): a stale redelivery changes nothing")
    # This task's id names the request, so a redelivery of it continues the same provisioning.
    chain = provision_chain(instance_id, request_id=self.request.id, **request)
    verify_id = chain.tasks[-1].options["task_id"]
    existing = records().get(instance_id)
    if existing is not None and existing.status is not Status.DELETED:
        if existing.get("request_id") != self.request.id:
            raise InstanceExists(f"instance {instance_id} already exists (status {existing.status.value})")
        if existing.status is not Status.NEW:
            # A redelivery after the chain started: it is on its way, do not start it twice.
            return {"instance_id": instance_id, "status": existing.status.value, "verify_task_id": verify_id}
        # NEW: recorded by `workflows.submit` (or a redelivery before create_queue ran): start it.
    chain.apply_async()
    return {"instance_id": instance_id, "status": Status.NEW.value, "verify_task_id": verify_id}


@app.task(name="workflows.delete", bind=True, throws=(ProvisioningError,))
def delete(self: Task, instance_id: str) -> dict[str, Any]:
    """Mark the instance DELETING (its provisioning chain stops), then start the delete chain.

    Deleting a DELETED instance changes nothing; running delete again on one stuck in DELETING
    resumes it. A request recorded by `workflows.submit_delete` starts its chain here; a
    redelivery of one whose chain was started starts nothing. Follow it with
    ``python -m workflows show ID`` or in Flower.
    """
    instance_id = validated_id(instance_id)
    if records().is_finished(self.request.id):
        raise RequestFinished(f"delete request {self.request.id} for {instance_id} finished long ago: "
                              "a stale redelivery changes nothing")
    record = records().get(instance_id)
    if record is not None and record.status is Status.DELETING \
            and record.get("delete_request_id") == self.request.id \
            and record.get("delete_chain_sent") == self.request.id:
        return {"instance_id": instance_id, "status": Status.DELETING.value}  # on its way already
    status = mark_deleting(instance_id, self.request.id)
    if status is None:
        # Its status changed under us (a step finished): read it again and decide again.
        raise self.retry(countdown=0.1, max_retries=5)
    if status is Status.DELETING:
        delete_chain(instance_id, self.request.id).apply_async()
        records().update(instance_id, delete_chain_sent=self.request.id)
    return {"instance_id": instance_id, "status": status.value}


@app.task(name=RESUME_TASK, throws=(ProvisioningError,))
def resume(instance_id: str, step: str) -> dict[str, Any]:
    """Resume a chain the reconciler found stalled (tasks/reconcile.py) at the step its record
    says comes next now (``step`` is what the reconciler saw). Every step is safe to run twice."""
    record = records().get(instance_id)
    now_next = next_step(record) if record is not None else None
    if record is None or now_next is None:
        return {"instance_id": instance_id, "resumed": None}
    resume_chain(record, now_next).apply_async()
    return {"instance_id": instance_id, "resumed": now_next, "seen_stalled_at": step}


def _guest_api_task(name: str) -> Any:
    """``workflows.<name>``: the guest API from `celery call` and Flower (tasks/guestapi.py).

    Positional arguments after the instance id follow the operation's arguments (a password
    only as a keyword: keywords are masked and sealed, positions are not). ``timeout_s`` bounds
    the wait for the guest's answer, which becomes this task's result; ``cast=True`` returns the
    guest message's id at once instead.
    """
    op = operation(name)
    positional = tuple(arg for arg in op.required + op.optional if arg != "password")

    def run(self: Task, instance_id: str, *args: Any, timeout_s: float | None = None, cast: bool = False,
            **arguments: Any) -> Any:
        if len(args) > len(positional):
            raise InvalidRequest("args", f"{name} takes {', '.join(positional) or 'nothing'} after the instance "
                                         "id" + (" (give the password as a keyword)" if "password" in
                                                 op.required else ""))
        if not isinstance(cast, bool):
            raise InvalidRequest("cast", f"{cast!r} is not true or false")
        return guestapi.call(instance_id, name, {**dict(zip(positional, args, strict=False)), **arguments},
                             timeout_s=timeout_s, cast=cast, request_id=self.request.id)

    run.__name__ = name
    run.__doc__ = f"{op.summary} (guest API)."
    return app.task(name=f"workflows.{name}", bind=True, throws=(ProvisioningError,))(run)


GUEST_API_TASKS = {name: _guest_api_task(name) for name in OPERATIONS}
