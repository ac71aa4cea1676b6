"""The taskmanager's Celery app: every module of `tasks` publishes and defines its tasks with it."""

from __future__ import annotations

from celery import Celery

# MaskingAMQP: a password is never displayed (events, Flower, logs) by any process that publishes.
app = Celery("tasks", amqp="tasks.masking:MaskingAMQP")
app.config_from_object("celeryconfig")
app.conf.include = ["tasks.taskmanager", "tasks.deletion", "workflows.tasks"]
