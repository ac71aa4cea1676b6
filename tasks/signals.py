"""Signal handlers of the taskmanager app."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import (
    celeryd_after_setup,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutdown,
)

from berth import roundtrips
from berth.config import ensure_safe
from berth.errors import UnsafeSettings
from tasks.drivers import LocalDriver
from tasks.runtime import broker, redis_client, taskmanager_queues

log = logging.getLogger(__name__)


@celeryd_after_setup.connect
def consume_the_steps_queue(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """A worker that consumes the taskmanager queue consumes the chains' steps too: on RabbitMQ
    they have a queue of their own (celeryconfig.berth_steps_queue), declared like any queue
    Celery creates (quorum on a cluster)."""
    queues = instance.app.amqp.queues
    if instance.app.conf.task_default_queue in queues.consume_from:
        for name in taskmanager_queues():
            if name not in queues.consume_from:
                queues.select_add(queues[name])


@worker_init.connect
def refuse_unsafe_settings(sender: Any = None, **_: Any) -> None:
    """A taskmanager with settings that could lose or repeat work does not start."""
    try:
        ensure_safe(sender.app.conf)
    except UnsafeSettings as exc:
        # SystemExit passes Celery's signal guard: the worker stops with this message.
        raise SystemExit(f"taskmanager refused to start: {exc}") from exc


@worker_ready.connect
def warn_if_guests_are_not_isolated(sender: Any = None, **_: Any) -> None:
    """A broker whose default user needs no password isolates nobody: say so at start."""
    try:
        problem = broker().isolation_problem()
    except Exception as exc:  # noqa: BLE001 - the broker may be away; the check is advice only
        log.warning("could not check whether the broker isolates guests: %s", exc)
        return
    if problem:
        log.warning("guests are NOT isolated: %s", problem)
    warn_about_broker_limits()


def warn_about_broker_limits() -> None:
    """A broker without a memory limit, a safe eviction policy or a value limit: say so at start."""
    try:
        warnings = broker().limit_warnings()
    except Exception as exc:  # noqa: BLE001 - the broker may be away; the check is advice only
        log.warning("could not check the broker's limits: %s", exc)
        return
    for warning in warnings:
        log.warning("broker limits: %s", warning)


@worker_shutdown.connect
def stop_local_guests(sender: Any = None, **_: Any) -> None:
    """Local guests are children of the taskmanager node that booted them: they stop with it."""
    hostname = getattr(sender, "hostname", None)
    if not hostname:
        return
    stopped = LocalDriver().stop_all(booted_by=hostname)
    if stopped:
        log.info("stopped %d local guest(s) on shutdown: %s", len(stopped), ", ".join(stopped))


if roundtrips.enabled():
    # `make bench` only (berth/roundtrips.py): each task's round trips and slot time, per task name.
    @worker_init.connect
    @worker_process_init.connect
    def count_round_trips(**_: Any) -> None:
        roundtrips.install()

    @task_prerun.connect
    def count_for_task(sender: Any = None, **_: Any) -> None:
        roundtrips.begin(getattr(sender, "name", "?"))

    @task_postrun.connect
    def counted_task_done(**_: Any) -> None:
        try:
            roundtrips.end(roundtrips.add_to(redis_client()))
        except Exception as exc:  # noqa: BLE001 - a benchmark's bookkeeping never fails a task
            log.warning("round trips not recorded: %s", exc)
