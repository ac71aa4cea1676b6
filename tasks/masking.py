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
from celery.utils.saferepr import saferepr

MASK = "********"
SECRET_KEYS = frozenset({"password", "users"})
# As long as Celery's own representations get.
REPR_MAX = 1024


def _masked_users(users: Any) -> Any:
    """Users keep their names; anything not shaped like [{name, password}] is hidden whole."""
    if isinstance(users, (list, tuple)) and all(isinstance(u, dict) for u in users):
        return [{k: (MASK if k == "password" else masked(v)) for k, v in u.items()} for u in users]
    return MASK


def masked(value: Any) -> Any:
    """A copy of value with every password (and any malformed users list) replaced by a mask."""
    if isinstance(value, dict):
        return {k: MASK if k == "password" else _masked_users(v) if k == "users" else masked(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [masked(v) for v in value]
    return value


def holds_secret(value: Any) -> bool:
    if isinstance(value, dict):
        return bool(SECRET_KEYS & set(value)) or any(holds_secret(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(holds_secret(v) for v in value)
    return False


class MaskingAMQP(AMQP):
    def as_task_v2(self, task_id: str, name: str, args: Any = None, kwargs: Any = None,
                   *rest: Any, **options: Any) -> Any:
        if holds_secret(args) or holds_secret(kwargs):
            options["argsrepr"] = saferepr(masked(list(args or ())), maxlen=REPR_MAX)
            options["kwargsrepr"] = saferepr(masked(dict(kwargs or {})), maxlen=REPR_MAX)
        return super().as_task_v2(task_id, name, args, kwargs, *rest, **options)
