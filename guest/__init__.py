"""The guest agent: `celery -A guest worker --instance-id ID`.

It consumes ``guest.ID`` and nothing else, and never declares it: the taskmanager created
the queue before sending anything. Remote control and events are off, so no broadcast queue
or event channel is used either. Prefetch 1 with late acks: a guest killed mid-prepare gets
the message again.

It connects as its own broker user and believes only messages signed with its own key
(``BERTH_GUEST_KEY``): both come from its boot driver, or from `python -m workflows guest-env ID`
for a guest started by hand (guest/authn.py, tasks/credentials.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import click
from celery import Celery, bootsteps
from kombu.entity import Exchange, Queue

from berth.config import UnsafeSettings, ensure_safe
from berth.ids import INSTANCE_ID_FORMAT, INSTANCE_ID_RE, guest_queue, unacked_keys
from berth.keys import GuestKey, KeyProblem
from berth.paths import guest_dir
from berth.unacked import RestoreOwnUnacked, use_own_hash
from guest.authn import SpentIds
from guest.recovery import AgentRunning, hold_agent_lock

app = Celery("guest")
app.config_from_object("celeryconfig")
app.conf.update(
    include=["guest.agent", "guest.api"],
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_enable_remote_control=False,
    # Events would need PUBLISH on a channel every worker shares: a guest's broker user has none.
    worker_send_task_events=False,
    task_send_sent_event=False,
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


@dataclass(frozen=True)
class Identity:
    """Who this guest is: its instance, its key, the messages it has run."""

    instance_id: str
    key: GuestKey
    spent: SpentIds


_identity: list[Identity] = []


def identity() -> Identity:
    if not _identity:
        raise RuntimeError("this guest has no identity yet (started without --instance-id?)")
    return _identity[-1]


def load_identity(instance_id: str) -> Identity:
    """This guest's key from BERTH_GUEST_KEY, checked; raises KeyProblem when missing or malformed."""
    text = os.environ.get("BERTH_GUEST_KEY")
    if not text:
        raise KeyProblem(f"BERTH_GUEST_KEY is not set: print the guest's settings with "
                         f"`python -m workflows guest-env {instance_id}`")
    named = os.environ.get("BERTH_INSTANCE_ID")
    if named and named != instance_id:
        raise KeyProblem(f"BERTH_INSTANCE_ID is {named}, not {instance_id}: these are another guest's settings")
    found = Identity(instance_id, GuestKey.from_text(text), SpentIds(guest_dir(instance_id)))
    _identity.append(found)
    return found


def own_queue_lookup(instance_id: str) -> None:
    """Put back a message this guest took to its own queue, without reading the queue's bindings.

    kombu looks the queue up in ``_kombu.binding.<exchange>`` when it restores a message; a guest's
    broker user may not read (or write) bindings, and every message it holds came from guest.ID,
    whatever exchange its envelope names.
    """
    from kombu.transport import redis as redis_transport

    name = guest_queue(instance_id)

    def lookup(self: Any, exchange: str, routing_key: str, default: Any = None) -> list[str]:
        return [name]

    redis_transport.Channel._lookup = lookup  # type: ignore[method-assign]


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
                load_identity(instance_id)
                # One agent per instance: its unacked keys are then its own to restore.
                hold_agent_lock(guest_dir(instance_id))
            except (UnsafeSettings, AgentRunning, KeyProblem) as exc:
                raise SystemExit(f"guest agent for {instance_id} refused to start: {exc}") from exc
            bind_instance(worker.app, instance_id)
            use_own_hash(worker.app.conf.broker_url)
            own_queue_lookup(instance_id)


app.steps["worker"].add(BindGuestQueue)
# Every berth_heartbeat_interval_s, the datastore's status on the guest's own list (guest/heartbeat.py).
from guest.heartbeat import Heartbeat  # noqa: E402

app.steps["worker"].add(Heartbeat)
# What a previous run of this guest took and never acknowledged goes back to guest.ID when the
# consumer connects, and again after a lost broker connection.
app.steps["consumer"].add(RestoreOwnUnacked)

__all__ = ["Identity", "app", "bind_instance", "identity"]
