"""The guest agent: `celery -A guest worker --instance-id ID`.

It consumes ``guest.ID`` and nothing else, and never declares it: the taskmanager created
the queue before sending anything. Remote control and events are off, so no broadcast queue
or event channel is used either. Prefetch 1 with late acks: a guest killed mid-prepare gets
the message again.

It connects as its own broker user and believes only messages signed with its own key
(``BERTH_GUEST_KEY``): both come from its boot driver, or from `python -m workflows guest-env ID`
for a guest started by hand (guest/authn.py, berth/brokers/redis/acl.py).
"""

from __future__ import annotations

from typing import Any

from celery import Celery, bootsteps
from kombu.entity import Exchange, Queue

from berth.brokers import broker_for
from berth.config import ensure_safe
from berth.errors import AgentRunning, KeyProblem, UnsafeSettings
from berth.ids import guest_queue
from berth.paths import guest_dir
from guest.celery_app import app
from guest.heartbeat import Heartbeat
from guest.identity import Identity, identity, load_identity
from guest.promptacks import PromptAcks
from guest.recovery import hold_agent_lock


def bind_instance(celery_app: Celery, instance_id: str) -> Queue:
    """Point the worker at guest.ID only, with per-guest ack-emulation keys."""
    name = guest_queue(instance_id)
    # The queue's type matters to Celery on RabbitMQ: a quorum queue takes no global QoS.
    arguments = {"x-queue-type": "quorum"} if celery_app.conf.berth_queue_type == "quorum" else None
    queue = Queue(name, Exchange(name, type="direct", durable=True), routing_key=name,
                  durable=True, no_declare=True, queue_arguments=arguments)
    celery_app.conf.berth_instance_id = instance_id
    celery_app.conf.task_default_queue = name
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
                load_identity(instance_id)
                # One agent per instance: its unacked keys are then its own to restore.
                hold_agent_lock(guest_dir(instance_id))
            except (UnsafeSettings, AgentRunning, KeyProblem) as exc:
                raise SystemExit(f"guest agent for {instance_id} refused to start: {exc}") from exc
            bind_instance(worker.app, instance_id)
            # The broker's own part: per-guest bookkeeping of what it takes (berth/brokers).
            broker_for(worker.app.conf.broker_url, worker.app.conf.result_backend,
                       queue_type=worker.app.conf.berth_queue_type).bind_guest(worker.app, instance_id)


app.steps["worker"].add(BindGuestQueue)
# Every berth_heartbeat_interval_s, the datastore's status on the guest's own list (guest/heartbeat.py).
app.steps["worker"].add(Heartbeat)
# What a previous run of this guest took and never acknowledged goes back to guest.ID when the
# consumer connects, and again after a lost broker connection.
for _step in broker_for(app.conf.broker_url, app.conf.result_backend).consumer_steps():
    app.steps["consumer"].add(_step)
# An acknowledgement goes out in the same turn of the event loop (guest/promptacks.py).
app.steps["consumer"].add(PromptAcks)

__all__ = ["Identity", "app", "bind_instance", "identity"]
