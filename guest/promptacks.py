"""Acknowledge at once: the agent's event loop never sleeps on a callback it has just queued.

kombu's event loop (its ``Hub``) runs the callbacks queued with ``call_soon``, then polls its
sockets for up to 10 s. A callback queued *while* it runs them, from the loop's own thread,
does not wake the poll: with the solo pool that is the acknowledgement of the task that just
ran (Celery's ``call_soon_ack``). On RabbitMQ, with prefetch 1 and late acks, the broker then
holds the guest's next message (a prepare, say) until the poll times out: a ten-second stall
after a guest that starts late answers its queued pings. On Redis the transport's own timers
wake the loop every second or so, which hid it.

This step adds a tick callback, run just before each poll, that wakes the poll at once when
callbacks are waiting: the acknowledgement goes out in the same turn of the loop.

The same poll held a stop: SIGTERM's handler asks the loop to stop, but Python resumes an
interrupted poll, so on RabbitMQ the agent went on polling for up to 10 s and its boot driver
killed it instead (on Redis, BRPOP's one-second timeout hid it). The step wakes the poll when
the worker starts shutting down too: the agent stops in milliseconds, its acknowledgements sent.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from celery.signals import worker_shutting_down

log = logging.getLogger("berth.guest")


class PromptAcks(bootsteps.StartStopStep):
    """Consumer step: wake the hub's poll whenever callbacks are queued before it."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        hub = getattr(c, "hub", None)
        if hub is None or not hasattr(hub, "_ready"):
            return  # no event loop (a synloop worker drains its pending operations itself)
        if getattr(hub, "berth_prompt_acks", None) is not None:
            return

        def wake_if_pending() -> None:
            waker = getattr(hub, "_waker", None)
            if hub._ready and waker is not None:
                waker.wake()

        def wake(**_: Any) -> None:
            waker = getattr(hub, "_waker", None)
            if waker is not None:
                waker.wake()

        hub.berth_prompt_acks = wake_if_pending
        hub.on_tick.add(wake_if_pending)
        worker_shutting_down.connect(wake, weak=False)
