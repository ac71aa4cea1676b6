"""The taskmanager's Celery app: every module of `tasks` publishes and defines its tasks with it."""

from __future__ import annotations

import logging

from celery import Celery

from berth.brokers.rabbitmq.celerysteps import prefetch_per_consumer, without_native_delayed_delivery
from tasks.results import install as trust_results_by_channel

# MaskingAMQP: a password is never displayed (events, Flower, logs) by any process that publishes.
app = Celery("tasks", amqp="tasks.masking:MaskingAMQP")
without_native_delayed_delivery()
# Requests and probes are not held behind a wave's steps by a prefetch both queues share.
prefetch_per_consumer()
# A result published on a guest's answer channel is believed only for the task it names (tasks/results.py).
trust_results_by_channel()
app.config_from_object("celeryconfig")
app.conf.include = ["tasks.taskmanager", "tasks.deletion", "workflows.tasks"]


class _SubSecondCountdowns(logging.Filter):
    """Drop Celery's warning that quorum queues on direct exchanges get no native delayed delivery.

    Berth's retry countdowns are fractions of a second (0.05 s, 0.1 s, ...), which Celery's native
    delayed delivery (whole seconds) would round to none: they go to their queue directly and
    the worker holds each until it is due, as on classic queues. The warning, once per retry,
    would drown the log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return "native delayed delivery" not in message and "Direct exchanges are not supported" not in message


for _name in ("celery.app.base", "kombu.transport.native_delayed_delivery"):
    logging.getLogger(_name).addFilter(_SubSecondCountdowns())
