"""Results published on Redis are believed only for the task their channel names.

Celery's Redis result backend delivers results to ``AsyncResult.get()`` through pub/sub: one
channel per task, ``celery-task-meta-<task id>``. A guest may publish on its own answer channels
(its broker user allows it, to store its answers), so whatever it publishes there reaches any
process of the control plane still subscribed to one of them (an ``.get()`` on a guest message
that timed out, say). Celery would then raise the decoding error of a guest's garbage out of an
unrelated ``.get()``, or take a well-formed result naming *another* task's id as that task's
result. `GuardedResultConsumer` drops a message that does not decode, or whose task id is not
the one its channel is for, with one log line, and goes on.

Installed for every process of the taskmanager's app (tasks/celery_app.py): the taskmanager, the
command line, Flower, a Python caller of the chains.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.backends import redis as celery_redis

log = logging.getLogger("berth.results")
_NOTHING: dict[str, Any] = {"status": "PENDING", "task_id": None}


class GuardedResultConsumer(celery_redis.ResultConsumer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        decode: Any = self.backend.decode_result

        def guarded(payload: Any) -> Any:
            try:
                meta = decode(payload)
            except Exception as exc:  # noqa: BLE001 - any payload, any error: not a result
                log.warning("dropped a published result that does not decode (%s)", type(exc).__name__)
                return _NOTHING
            return meta if isinstance(meta, dict) and "status" in meta else _NOTHING

        self._decode_result = guarded

    def on_state_change(self, meta: dict[str, Any], message: Any) -> None:
        if meta is _NOTHING:
            return
        channel = message.get("channel") if isinstance(message, dict) else None
        task_id = meta.get("task_id")
        if channel is not None and (not isinstance(task_id, str) or
                                    _as_bytes(channel) != _as_bytes(self._get_key_for_task(task_id))):
            log.warning("dropped a published result whose task id is not its channel's")
            return
        super().on_state_change(meta, message)


def _as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def install() -> None:
    celery_redis.RedisBackend.ResultConsumer = GuardedResultConsumer
