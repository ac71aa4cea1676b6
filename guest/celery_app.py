"""The guest agent's Celery app and its ``--instance-id`` option (the agent itself: `guest`)."""

from __future__ import annotations

import click
from celery import Celery

from berth.brokers.rabbitmq.celerysteps import without_native_delayed_delivery
from berth.config import on_rabbitmq
from berth.ids import INSTANCE_ID_FORMAT, INSTANCE_ID_RE

app = Celery("guest")
# A guest declares nothing, Celery's delayed-delivery topology included (berth/brokers/rabbitmq).
without_native_delayed_delivery()
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
# An idle guest's BRPOP timeout (Redis only: RabbitMQ pushes messages to a consumer), in kombu's
# transport options; celeryconfig.berth_guest_polling_interval_s says why this value.
if not on_rabbitmq(app.conf):
    if not 0 < app.conf.berth_guest_polling_interval_s < 25:
        raise ValueError(f"berth_guest_polling_interval_s ({app.conf.berth_guest_polling_interval_s:g} s, "
                         "BERTH_GUEST_POLLING_INTERVAL_S) must be above 0 and below kombu's health check "
                         "interval (25 s): 0 would block forever, and a longer wait sends a PING before every BRPOP")
    app.conf.broker_transport_options = {**app.conf.broker_transport_options,
                                         "polling_interval": app.conf.berth_guest_polling_interval_s}


def _check_instance_id(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not INSTANCE_ID_RE.fullmatch(value):
        raise click.BadParameter(f"{value!r} is not an instance id: expected {INSTANCE_ID_FORMAT}")
    return value


app.user_options["worker"].add(click.Option(
    ["--instance-id"], required=True, callback=_check_instance_id,
    help="The instance this guest serves; it consumes only the queue guest.ID."))
