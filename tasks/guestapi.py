"""Calling the guest API from the control plane: a call waits for the answer, a cast does not.

    from tasks.guestapi import call
    call("db-1", "list_users")                          # [{'name': 'app', 'databases': ['app']}]
    call("db-1", "restart", cast=True)                  # {'guest_task_id': ..., ...} at once

Before anything is sent: the arguments are checked (InvalidRequest), the instance must be
ACTIVE, SHUTDOWN or UNKNOWN (InstanceNotServing), and when its guest's last heartbeat is older
than ``berth_heartbeat_stale_s`` the guest is pinged first and must answer within
``berth_guest_ping_timeout_s`` (GuestUnreachable: nothing is sent to a guest that is not there).
A call's message expires with its timeout, so a guest that comes back later does not run what
its caller gave up on (GuestTimeout); an answer that is an error raises GuestError with the
guest's message. A password travels sealed with the guest's key.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import tasks.channel as channel
import tasks.heartbeats as heartbeats
import tasks.waiting as waiting
from berth.errors import (
    GuestError,
    GuestTimeout,
    GuestUnreachable,
    InstanceNotFound,
    InstanceNotServing,
    InvalidField,
    InvalidRequest,
    Malformed,
    SealError,
    UnknownOperation,
    from_invalid_field,
)
from berth.guestapi import check_answer, check_arguments, operation
from berth.ids import fresh_guest_task_id, guest_task_prefix, request_tag, result_key
from berth.keys import is_sealed, unseal_at_rest
from berth.records import SERVING, InstanceRecord
from berth.spec import check_instance_id
from tasks.channel import in_seconds
from tasks.runtime import raw_result_client, records, result_client, setting

log = logging.getLogger("berth.guestapi")


def _checked(instance_id: object, name: str, arguments: dict[str, Any],
             timeout_s: object) -> tuple[str, dict[str, Any], float]:
    try:
        instance_id = check_instance_id(instance_id)
        operation(name)
        if is_sealed(arguments.get("password")):
            arguments = {**arguments, "password": unseal_at_rest(arguments["password"])}
        checked = check_arguments(name, arguments)
    except InvalidField as exc:
        raise from_invalid_field(exc) from exc
    except UnknownOperation as exc:
        raise InvalidRequest("operation", str(exc)) from exc
    except SealError:
        raise InvalidRequest("password", "sealed with another master key (BERTH_MASTER_KEY differs "
                                         "between hosts?)") from None
    high = float(setting("guest_call_timeout_max_s"))
    timeout = setting("guest_call_timeout_s") if timeout_s is None else timeout_s
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= high:
        raise InvalidRequest("timeout_s", f"{timeout!r} is not a number of seconds above 0 and at most {high:g}")
    return instance_id, checked, float(timeout)


def serving(instance_id: str) -> InstanceRecord:
    """The instance's record, if its guest may be called."""
    record = records().get(instance_id)
    if record is None:
        raise InstanceNotFound(f"no instance {instance_id}")
    if record.status not in SERVING:
        raise InstanceNotServing(f"instance {instance_id} is {record.status.value}: the guest API needs it "
                                 f"ACTIVE, SHUTDOWN or UNKNOWN")
    return record


def _publish(record: InstanceRecord, task: str, kwargs: dict[str, Any], task_id: str | None,
             expires_in_s: float) -> str:
    """Send task to the guest, signed, expiring; task_id None: a fresh one named after the task."""
    instance_id = record.instance_id
    if task_id is None:
        task_id = fresh_guest_task_id(instance_id, task.removeprefix("guest."))
    channel.publish(instance_id, task, kwargs={"instance_id": instance_id, **kwargs}, task_id=task_id,
                    expires=in_seconds(expires_in_s), key=channel.key_of(record))
    return task_id


def ping_check(record: InstanceRecord) -> bool:
    """Ping the guest if its heartbeat is stale; True if a ping was needed (and answered).

    Raises GuestUnreachable when the guest does not answer within ``berth_guest_ping_timeout_s``.
    """
    if not heartbeats.stale(record, setting("heartbeat_stale_s")):
        return False
    timeout = float(setting("guest_ping_timeout_s"))
    age = heartbeats.age_s(record)
    ping_id = fresh_guest_task_id(record.instance_id, "apiping")
    pong = channel.ping(record, ping_id, expires=in_seconds(timeout), wait_s=timeout)
    result_client().delete(result_key(ping_id))
    if pong is None:
        heard = "never heard from" if age is None else f"last heartbeat {age:.0f} s ago"
        raise GuestUnreachable(f"guest of {record.instance_id} did not answer a ping within {timeout:g} s "
                               f"({heard}): nothing sent")
    return True


def message_id(instance_id: str, name: str, request_id: str) -> str:
    """The guest message's id for a request (a `workflows.<name>` task): the same when it is redelivered."""
    return f"{guest_task_prefix(instance_id)}{name}.{request_tag(request_id)}"


def call(instance_id: object, name: str, arguments: dict[str, Any] | None = None, *,
         timeout_s: float | None = None, cast: bool = False, request_id: str | None = None) -> Any:
    """Run guest.<name> on the instance's guest; its answer, or with ``cast`` the message's id.

    ``request_id`` makes the guest message's id follow from it: a request run again (its
    taskmanager died while it waited) finds the answer already given, or sends the same message,
    which the guest runs once.
    """
    iid, checked, timeout = _checked(instance_id, name, dict(arguments or {}), timeout_s)
    task_id = message_id(iid, name, request_id) if request_id else None
    answer = waiting.peek(raw_result_client(), task_id) if task_id else None
    started = time.monotonic()
    if answer is None:
        record = serving(iid)
        pinged = ping_check(record)
        if "password" in checked:
            checked["password"] = channel.key_of(record).seal(checked["password"])
        task_id = _publish(record, f"guest.{name}", checked, task_id,
                           float(setting("guest_cast_ttl_s")) if cast else timeout)
        if cast:
            log.info("instance %s: cast %s (%s)", iid, name, task_id)
            return {"instance_id": iid, "operation": name, "guest_task_id": task_id, "pinged": pinged}
        answer = waiting.wait_for_result(raw_result_client(), task_id, timeout)
    if answer is None:
        raise GuestTimeout(f"guest of {iid} did not answer {name} within {timeout:g} s (if it had not taken the "
                           "message by then, it never runs it: the message expires)")
    if request_id is None:
        result_client().delete(result_key(str(task_id)))
    log.info("instance %s: %s answered in %.0f ms (%s)", iid, name, (time.monotonic() - started) * 1000,
             answer.state)
    if not answer.ok:
        raise GuestError(f"guest of {iid}: {name} failed: {answer.error()}")
    try:
        return check_answer(name, answer.result)
    except Malformed as exc:
        raise GuestError(f"guest of {iid}: {name}: malformed answer: {exc}") from None
