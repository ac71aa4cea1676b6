"""The taskmanager: `celery -A tasks worker -Q taskmanager`.

It owns every guest's queue and every instance record; see `tasks.taskmanager` for the
provisioning steps and `workflows` for the chain that composes them.
"""

from __future__ import annotations

from celery import Celery

app = Celery("tasks", amqp="tasks.masking:MaskingAMQP")
app.config_from_object("celeryconfig")
app.conf.include = ["tasks.taskmanager", "workflows.tasks"]

from tasks import signals  # noqa: E402,F401  (masks secrets in every process that loads the app)

__all__ = ["app"]
