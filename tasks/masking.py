"""Passwords never shown: the displayed form of every task message is masked at its creation.

Celery shows a message's ``argsrepr``/``kwargsrepr`` in events (``task-sent``, ``task-received``),
Flower and logs. They are computed when the message is built, before any publish signal, so
masking happens here, in the app's AMQP class: every process that loads the taskmanager app
(the taskmanager, `celery -A tasks call`, `python -m workflows`, Flower's send-task API)
publishes masked representations.
"""

from __future__ import annotations

from typing import Any

from celery.app.amqp import AMQP

MASK = "********"


def masked(value: Any) -> Any:
    """A copy of value with every ``password`` field replaced by a mask."""
    if isinstance(value, dict):
        return {k: (MASK if k == "password" else masked(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [masked(v) for v in value]
    return value


def holds_password(value: Any) -> bool:
    if isinstance(value, dict):
        return "password" in value or any(holds_password(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(holds_password(v) for v in value)
    return False


class MaskingAMQP(AMQP):
    def as_task_v2(self, task_id: str, name: str, args: Any = None, kwargs: Any = None,
                   *rest: Any, **options: Any) -> Any:
        if holds_password(args) or holds_password(kwargs):
            options["argsrepr"] = repr(masked(list(args or ())))
            options["kwargsrepr"] = repr(masked(dict(kwargs or {})))
        return super().as_task_v2(task_id, name, args, kwargs, *rest, **options)
