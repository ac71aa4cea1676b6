"""Two of Celery's worker steps, adjusted for Berth on RabbitMQ.

**Native delayed delivery, switched off for Berth's workers.**

With quorum queues, Celery's worker adds a consumer step (``DelayedDelivery``) that declares 28
``celery_delayed_*`` exchanges and queues on every broker URL of a failover list, with retries
and sleeps on each node that does not answer. Berth uses none of it: its countdowns are fractions
of a second on direct exchanges, which that delivery (whole seconds, topic exchanges) does not
serve, so they go to their queue and the worker holds them until due. Left on, the step kept a
guest from consuming for 15 s and more while a cluster node was down (retrying that node), and
logged a refusal on every start (a guest may declare nothing).

**A prefetch per consumer, not per channel** (the taskmanager's). On RabbitMQ 3.3 to 3.13,
Celery applies its prefetch count to the whole channel when its queues are classic: a worker of
two processes then holds two messages, whichever queues they come from. The taskmanager consumes
two queues (the chains' steps, and everything else: celeryconfig.berth_steps_queue). With one
limit for both, once a wave's steps fill the two, a request or a probe is delivered only when a
step is acknowledged and RabbitMQ picks its queue over the steps' queue, which it may not do for
several steps in a row. With a limit per consumer, as Celery already sets for quorum queues,
each queue keeps its own: the request is delivered at once and is next for the first process
that frees up. Messages a worker holds stay unacknowledged until done, and go back to their
queue if the worker dies.
"""

from __future__ import annotations

from typing import Any

from celery.worker.consumer.delayed_delivery import DelayedDelivery
from celery.worker.consumer.tasks import Tasks


def without_native_delayed_delivery() -> None:
    """Leave Celery's DelayedDelivery consumer step out of every worker of this process."""

    def never(self: Any, c: Any) -> bool:
        return False

    DelayedDelivery.include_if = never


def prefetch_per_consumer() -> None:
    """Every worker of this process counts its prefetch per consumer (per queue), on any broker."""

    def per_consumer(self: Any, c: Any) -> bool:
        return False

    Tasks.qos_global = per_consumer
