"""The guest agent: `celery -A guest worker --instance-id ID`.

It consumes ``guest.ID`` and nothing else, and never declares it: the taskmanager created
the queue before sending anything. Remote control is off, so no broadcast queue exists
either. Prefetch 1 with late acks: a guest killed mid-prepare gets the message again.
"""

from __future__ import annotations

from typing import Any

import click
from celery import Celery, bootsteps
from kombu.entity import Exchange, Queue

from berth.config import UnsafeSettings, ensure_safe
from berth.ids import INSTANCE_ID_FORMAT, INSTANCE_ID_RE, guest_queue, unacked_keys
from berth.paths import guest_dir
from berth.unacked import RestoreOwnUnacked, use_own_hash
from guest.recovery import AgentRunning, hold_agent_lock

app = Celery("guest")
app.config_from_object("celeryconfig")
app.conf.update(
    include=["guest.agent"],
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_enable_remote_control=False,
    # Messages it cannot accept are dead-lettered (berth:deadletter:ID) and dropped, never retried.
    worker_consumer="guest.consumer:DeadLetteringConsumer",
    berth_instance_id=None,
)


def _check_instance_id(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not INSTANCE_ID_RE.fullmatch(value):
        raise click.BadParameter(f"{value!r} is not an instance id: expected {INSTANCE_ID_FORMAT}")
    return value


app.user_options["worker"].add(click.Option(
    ["--instance-id"], required=True, callback=_check_instance_id,
    help="The instance this guest serves; it consumes only the queue guest.ID."))


def bind_instance(celery_app: Celery, instance_id: str) -> Queue:
    """Point the worker at guest.ID only, with per-guest ack-emulation keys."""
    name = guest_queue(instance_id)
    queue = Queue(name, Exchange(name, type="direct", durable=True), routing_key=name,
                  durable=True, no_declare=True)
    celery_app.conf.berth_instance_id = instance_id
    celery_app.conf.task_default_queue = name
    celery_app.conf.broker_transport_options = {
        **celery_app.conf.broker_transport_options, **unacked_keys(instance_id)}
    celery_app.amqp.queues.add(queue)
    celery_app.amqp.queues.select([name])
    return queue


class BindGuestQueue(bootsteps.Step):
    """Worker boot step: runs after -Q is applied and before the consumer connects."""

    def __init__(self, worker: Any, instance_id: str | None = None, **options: Any) -> None:
        super().__init__(worker, **options)
        if instance_id:
            try:
                ensure_safe(worker.app.conf)
                # One agent per instance: its unacked keys are then its own to restore.
                hold_agent_lock(guest_dir(instance_id))
            except (UnsafeSettings, AgentRunning) as exc:
                raise SystemExit(f"guest agent for {instance_id} refused to start: {exc}") from exc
            bind_instance(worker.app, instance_id)
            use_own_hash(worker.app.conf.broker_url)


app.steps["worker"].add(BindGuestQueue)
# What a previous run of this guest took and never acknowledged goes back to guest.ID when the
# consumer connects, and again after a lost broker connection.
app.steps["consumer"].add(RestoreOwnUnacked)

__all__ = ["app", "bind_instance"]
