"""Delete, as a chain like provisioning: shutdown_guest -> remove_instance.

`workflows.delete` moves the record to DELETING first: from then on every provisioning step
finds its instance no longer in BUILD and stops (see `Step.after_return`). Then:

1. ``shutdown_guest`` pings the guest through its queue (a short deadline: a dead guest
   does not hold delete up) and, when it answers, asks it to shut its datastore down; the
   answer carries the guest's own count of prepare deliveries and applications;
2. ``remove_instance`` waits for a provisioning chain to stop, stops the guest with its boot
   driver, removes every key of the instance from the broker (queue and priority lists,
   bindings, unacked entries, results, secrets, dead letters) and marks it DELETED; the
   record stays as an audit trail for ``berth_deleted_record_ttl_s``.

Both steps are safe to run again (a taskmanager killed mid-delete, a second delete).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task

import tasks.channel as channel
import tasks.heartbeats as heartbeats
import tasks.outcomes as outcomes
import tasks.waiting as waiting
from berth.errors import InstanceNotDeleting, InstanceNotFound
from berth.ids import deadletter_key, guest_task_id
from berth.records import InstanceRecord, Status
from berth.untrusted import list_length
from tasks.celery_app import app
from tasks.drivers import DRIVERS
from tasks.runtime import broker, raw_result_client, records, redis_client, setting
from tasks.taskmanager import (
    Step,
    audit_counts,
    earlier_pong,
    instance_of,
    ping_countdown,
    send_ping,
    summary,
    utc_datetime,
)

log = logging.getLogger("berth.delete")
CHAIN_STOP_POLL_S = 0.2


def _deleting(instance_id: str) -> InstanceRecord:
    record = records().get(instance_id)
    if record is None:
        raise InstanceNotFound(f"instance {instance_id} has no record")
    if record.status is not Status.DELETING:
        raise InstanceNotDeleting(f"instance {instance_id} is {record.status.value}, not DELETING")
    return record


class DeleteStep(Step):
    """A delete step: broker hiccups retry; anything else is kept on the record for the operator.

    The instance stays DELETING, and running delete again resumes it.
    """

    ignore_result = True
    store_errors_even_if_ignored = False

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        instance_id = instance_of(args, kwargs)
        if isinstance(exc, (InstanceNotFound, InstanceNotDeleting)) or not isinstance(instance_id, str):
            return
        try:
            records().update(instance_id, delete_error=f"{self.name}: {type(exc).__name__}: {exc}"[:300])
        except Exception:  # noqa: BLE001 - the log keeps it when the broker cannot
            log.exception("instance %s: could not record the failure of %s", instance_id, self.name)


@app.task(base=DeleteStep, name="taskmanager.shutdown_guest", bind=True, max_retries=None)
def shutdown_guest(self: Task, instance_id: str) -> str:
    """Ping the guest, then ask it to stop its datastore; go on without it if it does not answer."""
    record = _deleting(instance_id)
    if record.get("guest_shutdown"):
        return instance_id  # done by an earlier run of this step
    if not broker().guest_queue_exists(instance_id):
        records().update(instance_id, guest_shutdown="no queue")
        return instance_id
    request_id = record["delete_request_id"]
    now = time.time()
    shutdown_id = guest_task_id(instance_id, request_id, "shutdown")
    sent_at = record.get("shutdown_sent_at")
    if sent_at is None:
        if not _guest_answers(self, record, request_id, now):
            records().update(instance_id, guest_shutdown="no answer to ping")
            return instance_id
        channel.publish(instance_id, "guest.shutdown", kwargs={"instance_id": instance_id},
                       task_id=shutdown_id, expires=utc_datetime(now + setting("shutdown_deadline_s")),
                        key=channel.key_of(record))
        sent_at = records().set_once(instance_id, "shutdown_sent_at", now)
        answer = waiting.wait_for_result(raw_result_client(), shutdown_id, setting("verify_reply_wait_s"))
    else:
        answer = waiting.peek(raw_result_client(), shutdown_id)
    if _shutdown_answered(instance_id, answer):
        return instance_id
    if time.time() >= sent_at + setting("shutdown_deadline_s"):
        records().update(instance_id, guest_shutdown="no answer to shutdown")
        return instance_id
    raise self.retry(countdown=setting("verify_backoff_cap_s"))


def _guest_answers(task: Task, record: InstanceRecord, request_id: str, now: float) -> bool:
    """Whether the guest answered a ping; retries the task while the delete's ping deadline lasts."""
    attempt, instance_id = task.request.retries, record.instance_id
    deadline_at = records().set_once(instance_id, "delete_ping_deadline_at", now + setting("delete_ping_deadline_s"))

    def ping_id(n: int) -> str:
        return guest_task_id(instance_id, request_id, f"dping{n}")

    if earlier_pong(instance_id, ping_id, attempt):
        return True
    if now >= deadline_at:
        return False
    countdown = ping_countdown(attempt, now, deadline_at)
    if send_ping(record, ping_id(attempt), now=now, countdown=countdown, wait=attempt == 0):
        return True
    raise task.retry(countdown=countdown)


def _shutdown_answered(instance_id: str, answer: waiting.GuestAnswer | None) -> bool:
    """Record the guest's answer to shutdown (with its audit counts); False if none yet."""
    if answer is None:
        return False
    outcome = "done" if answer.ok else f"failed: {answer.error()}"[:300]
    counts = audit_counts(answer.result) if answer.ok else {}
    records().update(instance_id, guest_shutdown=outcome, guest_shutdown_at=time.time(), **counts)
    return True


@app.task(base=DeleteStep, name="taskmanager.remove_instance", bind=True, max_retries=None)
def remove_instance(self: Task, instance_id: str) -> dict[str, Any]:
    """Stop the guest, remove every key of the instance but its record, mark it DELETED."""
    current = records().get(instance_id)
    if current is not None and current.status is Status.DELETED:
        return summary(current)
    record = _deleting(instance_id)
    now = time.time()
    started_at = records().set_once(instance_id, "remove_started_at", now)
    chain_running = record.get("deleted_from") in (Status.NEW.value, Status.BUILD.value) \
        and not record.get("chain_stopped_at")
    if chain_running and now < started_at + setting("chain_stop_wait_s"):
        # The chain's next step is queued or counting down; it stops as soon as it runs.
        raise self.retry(countdown=CHAIN_STOP_POLL_S)
    DRIVERS[record["boot"]].destroy(instance_id)
    dead_letters = list_length(redis_client(), deadletter_key(instance_id))
    # The guest's broker user first (Redis drops its connections): a guest still running
    # somewhere can write none of the keys removed next.
    broker().revoke_guest(instance_id)
    heartbeats.forget(redis_client(), instance_id)
    # Flower: what the guest answered shows as it answered; anything else is dropped now.
    outcomes.close(instance_id, outcomes.REVOKED, "dropped by delete")
    removed = broker().remove_instance(instance_id, extra_task_ids=(record["request_id"],))
    ttl_s = setting("deleted_record_ttl_s")
    # Before DELETED shows: a late redelivery of either request, sent the moment anyone sees
    # DELETED, must find its request finished already.
    records().finish_requests(ttl_s, record["request_id"], record["delete_request_id"])
    records().transition(instance_id, Status.DELETED, [Status.DELETING], "remove_instance",
                         deleted_at=time.time(), keys_removed=removed, dead_letters=dead_letters,
                         guest_user_revoked=1)
    records().expire(instance_id, ttl_s)
    log.info("instance %s: deleted (%d keys removed, guest shutdown: %s)", instance_id, removed,
             record.get("guest_shutdown"))
    final = records().get(instance_id)
    assert final is not None
    return summary(final)
