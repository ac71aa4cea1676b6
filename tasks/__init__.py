"""The taskmanager: `celery -A tasks worker -Q taskmanager`.

It owns every guest's queue and every instance record; see `tasks.taskmanager` for the
provisioning steps and `workflows` for the chain that composes them.
"""

from __future__ import annotations

from tasks import signals  # noqa: F401  (settings check at start; local guests stop with it)
from tasks.answers import PrepareAnswers
from tasks.celery_app import app
from tasks.heartbeats import HeartbeatMonitor
from tasks.nodes import OwnUnacked
from tasks.outcomes import OutcomeSweeper
from tasks.runtime import broker

# Each node keeps its in-flight messages apart and takes them back when it (re)connects.
app.steps["worker"].add(OwnUnacked)
# Guests' heartbeats: ACTIVE, SHUTDOWN or UNKNOWN from what they report, and from their silence.
app.steps["worker"].add(HeartbeatMonitor)
# A guest's answer to prepare makes its instance ACTIVE the moment it is stored (tasks/answers.py).
app.steps["worker"].add(PrepareAnswers)
# What became of each guest message, told to Flower at its expiry when no answer told it earlier.
app.steps["worker"].add(OutcomeSweeper)
# What the broker needs of every consumer (Redis: each puts back what it held unacknowledged).
for _step in broker().consumer_steps():
    app.steps["consumer"].add(_step)

__all__ = ["app"]
