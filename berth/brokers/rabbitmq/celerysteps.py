"""Celery's native delayed delivery, switched off for Berth's workers.

With quorum queues, Celery's worker adds a consumer step (``DelayedDelivery``) that declares 28
``celery_delayed_*`` exchanges and queues on every broker URL of a failover list, with retries
and sleeps on each node that does not answer. Berth uses none of it: its countdowns are fractions
of a second on direct exchanges, which that delivery (whole seconds, topic exchanges) does not
serve, so they go to their queue and the worker holds them until due. Left on, the step kept a
guest from consuming for 15 s and more while a cluster node was down (retrying that node), and
logged a refusal on every start (a guest may declare nothing).
"""

from __future__ import annotations

from typing import Any

from celery.worker.consumer.delayed_delivery import DelayedDelivery


def without_native_delayed_delivery() -> None:
    """Leave Celery's DelayedDelivery consumer step out of every worker of this process."""

    def never(self: Any, c: Any) -> bool:
        return False

    DelayedDelivery.include_if = never
