"""The taskmanager: `celery -A tasks worker -Q taskmanager`.

It owns every guest's queue and every instance record; see `tasks.taskmanager` for the
provisioning steps and `workflows` for the chain that composes them.
"""

from __future__ import annotations

from celery import Celery

# MaskingAMQP: a password is never displayed (events, Flower, logs) by any process that publishes.
app = Celery("tasks", amqp="tasks.masking:MaskingAMQP")
app.config_from_object("celeryconfig")
app.conf.include = ["tasks.taskmanager", "tasks.deletion", "workflows.tasks"]

from berth.unacked import RestoreOwnUnacked  # noqa: E402
from tasks import signals  # noqa: E402,F401  (settings check at start; local guests stop with it)
from tasks.answers import PrepareAnswers  # noqa: E402
from tasks.heartbeats import HeartbeatMonitor  # noqa: E402
from tasks.nodes import OwnUnacked  # noqa: E402

# Each node keeps its in-flight messages apart and takes them back when it (re)connects.
app.steps["worker"].add(OwnUnacked)
# Guests' heartbeats: ACTIVE, SHUTDOWN or UNKNOWN from what they report, and from their silence.
app.steps["worker"].add(HeartbeatMonitor)
# A guest's answer to prepare makes its instance ACTIVE the moment it is stored (tasks/answers.py).
app.steps["worker"].add(PrepareAnswers)
app.steps["consumer"].add(RestoreOwnUnacked)

__all__ = ["app"]
