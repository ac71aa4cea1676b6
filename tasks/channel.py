"""The guest channel: everything the control plane sends a guest goes through here, signed.

A guest's queue is declared by the taskmanager (the broker seam: berth/brokers) before anything
is sent to it; `publish` refuses to send to a queue that was never declared. `ping` is the one
ping of the chain, delete, the guest API and the command line. Reading the answers:
tasks/waiting.py; prepare's answers as they come: tasks/answers.py.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from celery.result import AsyncResult
from kombu.entity import Exchange, Queue

import tasks.outcomes as outcomes
import tasks.waiting as waiting
from berth.brokers import hosts_of, transport_of
from berth.errors import QueueMissing
from berth.guestapi import check_pong
from berth.ids import guest_queue, guest_task_prefix
from berth.keys import GuestKey, guest_key
from berth.records import InstanceRecord
from tasks.celery_app import app
from tasks.masking import signing_for
from tasks.runtime import broker, raw_result_client, records


def queue_for(instance_id: str, *, no_declare: bool = False) -> Queue:
    name = guest_queue(instance_id)
    return Queue(name, Exchange(name, type="direct", durable=True), routing_key=name,
                 durable=True, no_declare=no_declare)


def in_seconds(seconds: float) -> dt.datetime:
    """The expiry ``seconds`` from now, for `publish` and `ping`."""
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)


def key_of(record: InstanceRecord) -> GuestKey:
    """The key of the guest an instance record's provisioning request booted."""
    return guest_key(record.instance_id, record["request_id"])


def publish(instance_id: str, task_name: str, *, kwargs: dict[str, Any], task_id: str, expires: dt.datetime,
            key: GuestKey, kwargsrepr: str | None = None) -> AsyncResult:
    """Send one task to a guest's pre-created queue: persistent, with a fixed id and an expiry,
    signed with the guest's key (the guest refuses anything else). Raises QueueMissing rather
    than let the broker invent a queue that was never declared. Its outcome will show in Flower
    (`tasks.outcomes`)."""
    if not broker().guest_queue_exists(instance_id):
        raise QueueMissing(f"queue {guest_queue(instance_id)} does not exist: create_queue first")
    if not task_id.startswith(guest_task_prefix(instance_id)):
        raise ValueError(f"task id {task_id!r} does not start with {guest_task_prefix(instance_id)!r}")
    # On the ledger before it is sent: a guest may answer before the publish returns, and the
    # listener tells only what the ledger holds (an answer read and removed by its caller would
    # otherwise show EXPIRED).
    outcomes.expect(task_id, task_name, expires.timestamp())
    try:
        with signing_for(instance_id, key):
            sent = app.send_task(
                task_name, kwargs=kwargs, task_id=task_id, queue=queue_for(instance_id, no_declare=True),
                # The queue exists (checked above); declaring again would re-create a deleted one.
                declare=[], expires=expires, kwargsrepr=kwargsrepr, delivery_mode=2)
    except BaseException:
        outcomes.unexpect(task_id)  # never sent: nothing to tell
        raise
    _unsubscribe(task_id)
    return sent


def _unsubscribe(task_id: str) -> None:
    """Leave the result channel Celery's Redis backend subscribed this process to on sending.

    A guest's answer is read with a bounded GET (tasks/waiting.py) or by the taskmanager's own
    listener, never through Celery's pub/sub: staying subscribed would grow a long-lived
    process's subscriptions by one per guest message, and let a hostile guest's garbage on its
    own answer channel reach the next ``AsyncResult.get()`` of this process, whatever result that
    waits for. ``.get()`` on the returned result subscribes again (and reads what is stored).
    """
    consumer = getattr(app.backend, "result_consumer", None)
    cancel = getattr(consumer, "cancel_for", None)
    if cancel is not None:
        cancel(task_id)


def ping(record: InstanceRecord, ping_id: str, *, expires: dt.datetime, wait_s: float) -> dict[str, Any] | None:
    """The one ping: ``guest.ping`` through the guest's own queue, then its pong if it comes within
    ``wait_s`` (0: look once, do not wait). Used by the chain, delete, the guest API and the CLI.

    Only a pong from this instance's own guest counts (`berth.guestapi.check_pong`); a pidbox
    ping would not prove that ``guest.ID`` is consumed.
    """
    instance_id = record.instance_id
    publish(instance_id, "guest.ping", kwargs={"instance_id": instance_id}, task_id=ping_id, expires=expires,
            key=key_of(record))
    answer = waiting.wait_for_result(raw_result_client(), ping_id, wait_s)
    return check_pong(answer.result, instance_id) if answer is not None and answer.ok else None


def pong_of(instance_id: str, ping_id: str) -> dict[str, Any] | None:
    """The pong to an earlier ping, if the guest has answered it by now."""
    answer = waiting.peek(raw_result_client(), ping_id)
    return check_pong(answer.result, instance_id) if answer is not None and answer.ok else None


def guest_address(instance_id: str) -> dict[str, str]:
    """Where the guest connects from and how (``tls``, ``plain``, ``mixed``), as the broker sees its
    connections now, as record fields (for `list` and the metrics); empty when it has none open."""
    connections = broker().guest_connections(instance_id)
    if not connections:
        return {}
    return {"guest_host": hosts_of(connections), "guest_transport": transport_of(connections)}


def note_guest_address(instance_id: str) -> dict[str, str] | None:
    """`guest_address`, kept on the record; None when the guest has no connection open."""
    fields = guest_address(instance_id)
    if fields:
        records().update(instance_id, **fields)
    return fields or None
