"""Signal handlers of the taskmanager app.

`mask_secrets` runs in every process that publishes through this app: the taskmanager,
`celery -A tasks call`, `python -m workflows` and Flower's send-task API. It rewrites the
``argsrepr``/``kwargsrepr`` headers that events and Flower display, so passwords never show.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import before_task_publish, worker_shutdown

log = logging.getLogger(__name__)
MASK = "********"


def masked(value: Any) -> Any:
    """A copy of value with every ``password`` field replaced by a mask."""
    if isinstance(value, dict):
        return {k: (MASK if k == "password" else masked(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [masked(v) for v in value]
    return value


@before_task_publish.connect
def mask_secrets(headers: dict[str, Any] | None = None, body: Any = None, **_: Any) -> None:
    if not headers or not isinstance(body, (list, tuple)) or len(body) < 2:
        return
    args, kwargs = body[0], body[1]
    if "password" in repr(args) or "password" in repr(kwargs):
        headers["argsrepr"] = repr(masked(args))
        headers["kwargsrepr"] = repr(masked(kwargs))


@worker_shutdown.connect
def stop_local_guests(sender: Any = None, **_: Any) -> None:
    """Local guests are children of the taskmanager node that booted them: they stop with it."""
    from tasks.drivers import LocalDriver

    hostname = getattr(sender, "hostname", None)
    if not hostname:
        return
    stopped = LocalDriver().stop_all(booted_by=hostname)
    if stopped:
        log.info("stopped %d local guest(s) on shutdown: %s", len(stopped), ", ".join(stopped))
