"""`workflows.provision`: the task that starts the chain, for `celery call` and Flower's API."""

from __future__ import annotations

from typing import Any

from celery import Task

from tasks import app
from tasks.errors import InstanceExists, ProvisioningError
from tasks.records import Status
from tasks.runtime import records
from workflows import provision_chain


@app.task(name="workflows.provision", bind=True, throws=(ProvisioningError,))
def provision(self: Task, instance_id: str, **request: Any) -> dict[str, Any]:
    """Validate, refuse an id already in use, then start the provisioning chain.

    Returns at once with the id of the chain's last task; follow the instance with
    ``python -m workflows show ID`` or in Flower.
    """
    # This task's id names the request, so a redelivery of it continues the same provisioning.
    chain = provision_chain(instance_id, request_id=self.request.id, **request)
    verify_id = chain.tasks[-1].options["task_id"]
    existing = records().get(instance_id)
    if existing is not None and existing.status is not Status.DELETED:
        if existing.get("request_id") != self.request.id:
            raise InstanceExists(f"instance {instance_id} already exists (status {existing.status.value})")
        # A redelivery after the chain started: it is on its way, do not start it twice.
        return {"instance_id": instance_id, "status": existing.status.value, "verify_task_id": verify_id}
    chain.apply_async()
    return {"instance_id": instance_id, "status": Status.NEW.value, "verify_task_id": verify_id}
