"""The provisioning steps, one task each, in chain order:

    create_queue -> ping_guest -> send_prepare -> verify

create_queue also boots the guest (a driver call, not a broker hop of its own).

Every step takes the instance id, reads what it needs from the instance record and is safe
to run twice (a taskmanager killed mid-step gets its message again). No step waits long:
ping_guest and verify look for the guest's answer, then retry with a countdown.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any, NoReturn

from celery import Task, states
from celery.exceptions import Reject

import tasks.channel as channel
import tasks.heartbeats as heartbeats
import tasks.outcomes as outcomes
import tasks.secrets as secrets
import tasks.waiting as waiting
from berth import checkpoints, metrics
from berth.brokers import CONNECTION_ERRORS
from berth.config import STEP_RETRY_BACKOFF_MAX_S
from berth.errors import (
    BootFailed,
    GuestUnreachable,
    InstanceExists,
    InstanceNotBuilding,
    InstanceNotFound,
    InvalidField,
    InvalidRequest,
    Malformed,
    PrepareFailed,
    PrepareTimeout,
    ProvisioningError,
    RequestFinished,
    SealError,
    StillWaiting,
    from_invalid_field,
)
from berth.guestapi import check_connection, check_count
from berth.ids import (
    PROVISION_STEPS,
    RETIRED_STEPS,
    guest_queue,
    ping_task_id,
    prepare_task_id,
    result_key,
    step_task_id,
)
from berth.keys import is_sealed, unseal_at_rest
from berth.records import SERVING, InstanceRecord, Reason, Status
from berth.spec import ProvisionRequest, validate_request
from berth.timing import next_countdown
from tasks.celery_app import app
from tasks.drivers import DRIVERS
from tasks.runtime import broker, limits, nothing_waiting, raw_result_client, records, redis_client, setting

log = logging.getLogger("berth.taskmanager")

REQUEST_FIELDS = frozenset({"datastore", "boot", "boot_delay_s", "ping_deadline_s",
                            "prepare_deadline_s", "users", "databases", "config"})
# A secret outlives the longest possible build by this much, then expires by itself.
SECRETS_MARGIN_S = 600.0


def validated(instance_id: object, **fields: Any) -> ProvisionRequest:
    """The request with defaults from the settings, or InvalidRequest naming the bad field."""
    unknown = sorted(set(fields) - REQUEST_FIELDS)
    if unknown:
        raise InvalidRequest(unknown[0], f"unknown field (accepted: {', '.join(sorted(REQUEST_FIELDS))})")
    if "users" in fields:
        fields["users"] = unsealed_users(fields["users"])
    fields.setdefault("ping_deadline_s", setting("ping_deadline_s"))
    fields.setdefault("prepare_deadline_s", setting("prepare_deadline_s"))
    try:
        return validate_request(instance_id, limits=limits(), **fields)
    except InvalidField as exc:
        raise from_invalid_field(exc) from exc


def unsealed_users(users: Any) -> Any:
    """Users with their passwords opened: a provisioning message carries them sealed at rest.

    Anything not shaped like users is left for validation to name.
    """
    if not isinstance(users, (list, tuple)):
        return users
    opened = []
    for user in users:
        if isinstance(user, dict) and is_sealed(user.get("password")):
            try:
                user = {**user, "password": unseal_at_rest(user["password"])}
            except SealError:
                raise InvalidRequest("users", f"the password of {user.get('name')!r} was sealed with another "
                                              "master key (BERTH_MASTER_KEY differs between hosts?)") from None
        opened.append(user)
    return opened


def register(request: ProvisionRequest, request_id: str) -> bool:
    """Record the request as NEW and keep its passwords aside; False if this request did already.

    Raises InstanceExists when another request owns the id.
    """
    ttl = request.boot_delay_s + request.ping_deadline_s + request.prepare_deadline_s + SECRETS_MARGIN_S
    # One round trip, all or nothing: without its secrets the record would block the id for nothing.
    return records().create(request, request_id=request_id, sealed=secrets.sealed(request.users), secrets_ttl_s=ttl)


def _building(instance_id: str, task: Task | None = None) -> InstanceRecord:
    """The instance's record, in BUILD: as ``task``'s start read it (`Step.before_start`), else read now."""
    record = _read_at_start(task) or records().get(instance_id)
    if record is None:
        raise InstanceNotFound(f"instance {instance_id} has no record")
    if record.status is not Status.BUILD:
        raise InstanceNotBuilding(f"instance {instance_id} is {record.status.value}, not BUILD: chain stopped")
    return record


def _mark_failed(instance_id: str, reason: Reason, step: str, error: str) -> bool:
    """NEW/BUILD -> FAILED; then nothing of the build is left to run on the guest."""
    if not records().transition(instance_id, Status.FAILED, [Status.NEW, Status.BUILD], step,
                                reason=reason, error=error, failed_at=time.time()):
        return False
    secrets.drop(redis_client(), instance_id)
    # Anything queued for the guest, or taken and not yet acknowledged, is stale now:
    # a guest that comes (back) later finds nothing to run.
    broker().purge_guest_queue(instance_id)
    broker().forget_guest_unacked(instance_id)
    # Flower: what the guest never answered expired (it was not there in time) or was dropped.
    expired = reason in (Reason.GUEST_UNREACHABLE, Reason.PREPARE_TIMEOUT)
    outcomes.close(instance_id, outcomes.EXPIRED if expired else outcomes.REVOKED,
                   f"instance failed: {reason.value}" if expired else f"dropped: instance failed ({reason.value})")
    return True


def _fail(instance_id: str, reason: Reason, step: str, error: str, exc: type[ProvisioningError]) -> NoReturn:
    if not _mark_failed(instance_id, reason, step, error):
        record = records().get(instance_id)
        status = record.status.value if record else "gone"
        raise InstanceNotBuilding(f"instance {instance_id} is {status}: not failed again by {step}")
    raise exc(f"instance {instance_id}: {reason.value}: {error}")


def _read_at_start(task: Task | None) -> InstanceRecord | None:
    """The record that `Step.before_start` read for this run of ``task``, once; None if it did not."""
    if task is None:
        return None
    record = getattr(task.request, "berth_record", None)
    task.request.berth_record = None
    return record if isinstance(record, InstanceRecord) else None


# Errors that say nothing about the instance's own build (or were recorded already).
NOT_THE_BUILDS_FAULT = (InstanceExists, InstanceNotBuilding, InstanceNotFound, InvalidRequest, RequestFinished)


def instance_of(args: Any, kwargs: Any) -> object:
    """The instance id a step was called with (its first argument)."""
    return args[0] if args else kwargs.get("instance_id")


class Step(Task):
    """A provisioning step: never strands its instance in BUILD.

    A broker or Redis hiccup retries the step with backoff; an error nobody planned for fails
    the instance with INTERNAL_ERROR; a retry that cannot be published keeps the delivery.
    """

    throws = (ProvisioningError,)
    # A step's success is the instance id, which the chain hands to the next step itself: not
    # stored (a write per step that nobody reads). A failure is stored, for `celery result` and
    # for the chain's caller; verify stores its summary, the chain's result.
    ignore_result = True
    store_errors_even_if_ignored = True
    # A connection to the broker that breaks under a publish (a node going away) too.
    autoretry_for = (*CONNECTION_ERRORS, BrokenPipeError)
    retry_backoff = 1
    retry_backoff_max = int(STEP_RETRY_BACKOFF_MAX_S)
    # A broker outage of a minute or so is ridden out (a RabbitMQ node takes seconds to restart;
    # Celery's default of 3 jittered retries gave up within a few): about 50 s on average.
    max_retries = 12

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().retry(*args, **kwargs)
        except Reject as exc:
            if exc.requeue:
                raise
            # Celery drops a message whose retry could not be published; put it back instead,
            # so the step runs again once the broker answers.
            raise Reject(exc.reason, requeue=True) from exc

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        instance_id = instance_of(args, kwargs)
        if isinstance(exc, NOT_THE_BUILDS_FAULT) or not isinstance(instance_id, str):
            return
        step = self.name.rsplit(".", 1)[-1]
        try:
            record = records().get(instance_id)
            # Only the instance's own chain may fail it: a stray call of a step from a shell may not.
            if record is None or task_id != step_task_id(instance_id, record["request_id"], step):
                return
            _mark_failed(instance_id, Reason.INTERNAL_ERROR, step, f"{type(exc).__name__}: {exc}"[:300])
        except Exception:  # noqa: BLE001 - the broker may be the thing that failed; the log keeps it
            log.exception("instance %s: could not record the failure of %s", instance_id, step)

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        """Note that the chain ran a step now (for the reconciler) and, on its first run, when the
        step started (for berth_step_duration_seconds): one round trip, best effort.

        An error here would fail the task outside its retries (Celery runs this hook inside the
        task's error handling, not inside autoretry): a broker that drops the connection at this
        moment would fail the instance. The step itself meets the same broker error and retries.
        """
        instance_id = instance_of(args, kwargs)
        self.request.berth_record = None
        if isinstance(instance_id, str):
            try:
                # The record as the step starts: the step reads it from here (`_building`).
                self.request.berth_record = metrics.step_started(records(), instance_id,
                                                                 self.name.rsplit(".", 1)[-1], task_id, ran=True)
            except Exception as exc:  # noqa: BLE001 - bookkeeping never fails a step
                log.warning("instance %s: start of %s not recorded: %s", instance_id, self.name, exc)

    def after_return(self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """A step of the instance's own chain that succeeded is observed for metrics, once.

        A chain stopped by delete takes its results with it, then tells delete it has stopped.

        Celery stores the stopping step's failure, and the same failure for every step after it,
        before this runs; delete waits for ``chain_stopped_at`` so that no result of the instance
        appears after delete removed them.
        """
        instance_id = instance_of(args, kwargs)
        if status == states.SUCCESS and isinstance(instance_id, str):
            try:
                # Observed once per step of the instance's own chain, logged as a structured line.
                metrics.step_succeeded(records(), instance_id, self.name.rsplit(".", 1)[-1], task_id,
                                       retries=int(self.request.retries or 0))
            except Exception as exc:  # noqa: BLE001 - a metric never fails a step
                log.warning("instance %s: %s not observed for metrics: %s", instance_id, self.name, exc)
        if not isinstance(retval, InstanceNotBuilding) or not isinstance(instance_id, str):
            return
        record = records().get(instance_id)
        if record is None or record.status not in (Status.DELETING, Status.DELETED):
            return
        request_id = record["request_id"]
        steps = PROVISION_STEPS + RETIRED_STEPS
        if task_id not in {step_task_id(instance_id, request_id, step) for step in steps}:
            return
        stale = [result_key(step_task_id(instance_id, request_id, step)) for step in steps]
        redis_client().delete(*stale)
        records().set_once(instance_id, "chain_stopped_at", time.time())
        log.info("instance %s: provisioning chain stopped at %s for delete", instance_id, self.name)


def summary(record: InstanceRecord) -> dict[str, Any]:
    return {"instance_id": record.instance_id, "status": record.status.value,
            "reason": record.reason, "connection": record.get("connection")}


@app.task(base=Step, name="taskmanager.create_queue", bind=True)
def create_queue(self: Task, instance_id: str, request_id: str | None = None, **fields: Any) -> str:
    """Record the instance, declare guest.ID durably before anything is sent to it, then boot the guest.

    ``request_id`` names the provisioning request: the same request arriving again (a
    redelivery) goes on; another request for an id in use is refused with InstanceExists.
    Booting is a driver call, safe to repeat (a guest already running is left alone).
    """
    request_id = request_id or self.request.root_id or self.request.id
    register(validated(instance_id, **fields), request_id)
    broker().declare_guest_queue(instance_id)
    # The guest's own broker user, before anything can boot it: it may touch its own keys only.
    broker().mint_guest(instance_id, request_id)
    records().transition(instance_id, Status.BUILD, [Status.NEW], "create_queue",
                         queue_created_at=time.time())
    _boot(instance_id, _building(instance_id), "create_queue", self.request.hostname or "")
    checkpoints.reached("create_queue.done")
    return instance_id


def _boot(instance_id: str, record: InstanceRecord, step: str, hostname: str) -> None:
    """Start the guest with the instance's boot driver (`none` leaves it to someone else)."""
    driver = DRIVERS[record["boot"]]
    try:
        info = driver.boot(instance_id, record["boot_delay_s"], booted_by=hostname, request_id=record["request_id"])
    except OSError as exc:
        _fail(instance_id, Reason.BOOT_FAILED, step, f"{driver.name} driver: {exc}", BootFailed)
    fresh = not info.get("already_running", True)
    records().update_counting(instance_id, "boots" if fresh else None, booted_at=time.time())
    log.info("instance %s: boot driver %s: %s", instance_id, driver.name, info)


@app.task(base=Step, name="taskmanager.boot_guest", bind=True)
def boot_guest(self: Task, instance_id: str) -> str:
    """A step of earlier chains (berth.ids.RETIRED_STEPS), for a chain in flight across an upgrade."""
    _boot(instance_id, _building(instance_id), "boot_guest", self.request.hostname or "")
    return instance_id


def earlier_pong(instance_id: str, ping_id: Callable[[int], str], attempt: int) -> dict[str, Any] | None:
    """The guest's answer to either of the last two pings, if it answered as this instance."""
    for earlier in (attempt - 1, attempt - 2):
        if earlier >= 0:
            pong = channel.pong_of(instance_id, ping_id(earlier))
            if pong:
                return pong
    return None


def send_ping(record: InstanceRecord, ping_id: str, *, now: float, countdown: float,
              wait: bool) -> dict[str, Any] | None:
    """Ping the guest through its queue; with ``wait``, return its pong if it comes at once.

    A ping lives until the check after next, then expires unread: a guest that comes up
    late answers a fresh ping instead of working through a backlog of stale ones.
    """
    # Optimistic fast path: a live guest answers in milliseconds.
    wait_s = min(setting("ping_reply_wait_s"), countdown) if wait else 0.0
    return channel.ping(record, ping_id, expires=utc_datetime(now + 2 * countdown + 1.0), wait_s=wait_s)


def _guest_ready(instance_id: str, pong: dict[str, Any], attempts: int, **more: Any) -> str:
    """Record that the guest answered, with where it connects from, in one write."""
    try:
        address = channel.guest_address(instance_id)
    except Exception as exc:  # noqa: BLE001 - shown by `show` later; never fails provisioning
        address = {}
        log.warning("instance %s: guest address not recorded: %s: %s", instance_id, type(exc).__name__, exc)
    records().update(instance_id, guest_ready_at=time.time(), guest_version=pong["version"], **address, **more)
    log.info("instance %s: guest answered ping (attempts=%d version=%s address=%s)", instance_id, attempts,
             pong.get("version"), address or None)
    return instance_id


def ping_countdown(attempt: int, now: float, deadline_at: float) -> float:
    return next_countdown(attempt, now=now, deadline_at=deadline_at,
                          base_s=setting("ping_backoff_base_s"), cap_s=setting("ping_backoff_cap_s"))


@app.task(base=Step, name="taskmanager.ping_guest", bind=True, max_retries=None)
def ping_guest(self: Task, instance_id: str) -> str:
    """Ping through guest.ID until it answers or the per-instance deadline passes."""
    record = _building(instance_id, self)
    attempt, now = self.request.retries, time.time()
    deadline_at = records().set_each_once(instance_id, ping_started_at=now,
                                          ping_deadline_at=now + record["ping_deadline_s"])["ping_deadline_at"]

    def ping_id(n: int) -> str:
        return ping_task_id(instance_id, record["request_id"], n)

    pong = earlier_pong(instance_id, ping_id, attempt)
    if pong:
        return _guest_ready(instance_id, pong, attempt)
    if now >= deadline_at:
        _fail(instance_id, Reason.GUEST_UNREACHABLE, "ping_guest",
              f"no answer to {attempt} ping(s) within {record['ping_deadline_s']:g} s", GuestUnreachable)
    countdown = ping_countdown(attempt, now, deadline_at)
    # The first ping waits a moment for a live guest's pong, unless other work waits for the slot.
    wait = attempt == 0 and nothing_waiting()
    pong = send_ping(record, ping_id(attempt), now=now, countdown=countdown, wait=wait)
    if pong:
        return _guest_ready(instance_id, pong, 1, ping_attempts=attempt + 1)
    # RabbitMQ tells whether anything consumes guest.ID (Redis cannot: None): shown while waiting.
    consumers = broker().consumers(instance_id)
    records().update(instance_id, ping_attempts=attempt + 1,
                     **({} if consumers is None else {"guest_consumers": consumers}))
    nobody = f" (nobody consumes {guest_queue(instance_id)} yet)" if consumers == 0 else ""
    raise self.retry(countdown=countdown, exc=StillWaiting(
        f"instance {instance_id}: waiting for guest, ping {attempt + 1} unanswered{nobody}, "
        f"{max(0.0, deadline_at - now):.1f} s left, next ping in {countdown:.2f} s"))


@app.task(base=Step, name="taskmanager.send_prepare", bind=True)
def send_prepare(self: Task, instance_id: str) -> str:
    """Publish guest.prepare: fixed id, acks_late on the guest, expiring at the prepare deadline."""
    record = _building(instance_id, self)
    now = time.time()
    deadline_at = records().set_once(instance_id, "prepare_deadline_at", now + record["prepare_deadline_s"])
    passwords = secrets.load(redis_client(), instance_id)
    missing = [name for name in record["users"] if name not in passwords]
    if missing:
        _fail(instance_id, Reason.PREPARE_FAILED, "send_prepare",
              f"the passwords of {', '.join(missing)} are gone (expired before prepare)", PrepareFailed)
    if record.get("prepare_sent_at") is None:
        # Not published yet, or published by a run that died before recording it: a second
        # copy then reaches the guest, whose journal applies it once.
        # The passwords travel sealed with this guest's key: only it can read them.
        key = channel.key_of(record)
        kwargs = {"instance_id": instance_id, "datastore": record["datastore"],
                  "users": [{"name": n, "password": key.seal(passwords[n])} for n in record["users"]],
                  "databases": record["databases"], "config": record["config"]}
        channel.publish(instance_id, "guest.prepare", kwargs=kwargs, key=key,
                       task_id=prepare_task_id(instance_id, record["request_id"]), expires=utc_datetime(deadline_at))
        records().count_and_set_once(instance_id, "prepare_sent", "prepare_sent_at", now)
    checkpoints.reached("send_prepare.done")
    return instance_id


@app.task(base=Step, name="taskmanager.verify", bind=True, max_retries=None, ignore_result=False)
def verify(self: Task, instance_id: str) -> dict[str, Any]:
    """ACTIVE once the guest reports prepare done; its error fails the instance at once."""
    current = _read_at_start(self) or records().get(instance_id)
    if current is not None and current.status in SERVING:
        # Made ACTIVE already: by a run of this step before a redelivery, or by the taskmanager's
        # listener the moment the guest answered (tasks/answers.py); and maybe a heartbeat since.
        # Watched, whatever stopped the first run between its transition and its watch.
        heartbeats.watch(redis_client(), instance_id, time.time(), only_new=True)
        return summary(current)
    # One read decides: the listener may make it ACTIVE any moment now, and _activate copes.
    record = current if current is not None and current.status is Status.BUILD else _building(instance_id)
    attempt, now = self.request.retries, time.time()
    deadline_at = float(record["prepare_deadline_at"])
    # A moment's wait for the answer on the first look, unless other work waits for the slot (the
    # taskmanager's listener, tasks/answers.py, sees the answer the moment it comes anyway).
    wait_s = setting("verify_reply_wait_s") if attempt == 0 and nothing_waiting() else 0.0
    answer = waiting.wait_for_result(raw_result_client(), prepare_task_id(instance_id, record["request_id"]),
                                     min(wait_s, max(0.0, deadline_at - now)))
    if answer is not None and answer.ok:
        answer = prepare_answer(answer)
    if answer is not None and answer.ok:
        return _activate(instance_id, answer.result)
    if answer is not None and answer.state in ("FAILURE", waiting.MALFORMED):
        _fail(instance_id, Reason.PREPARE_FAILED, "verify", answer.error(), PrepareFailed)
    if answer is not None or time.time() >= deadline_at:
        # REVOKED: the guest received prepare after it expired and did not run it.
        _fail(instance_id, Reason.PREPARE_TIMEOUT, "verify",
              f"prepare not done within {record['prepare_deadline_s']:g} s", PrepareTimeout)
    countdown = next_countdown(attempt, now=now, deadline_at=deadline_at,
                               base_s=setting("verify_backoff_base_s"), cap_s=setting("verify_backoff_cap_s"))
    raise self.retry(countdown=countdown, exc=StillWaiting(
        f"instance {instance_id}: waiting for prepare, {max(0.0, deadline_at - now):.1f} s left"))


def prepare_answer(answer: waiting.GuestAnswer) -> waiting.GuestAnswer:
    """A successful prepare answer with its connection checked (`check_connection`), or MALFORMED."""
    if not isinstance(answer.result, dict):
        return waiting.GuestAnswer(waiting.MALFORMED, "prepare's answer is not an object")
    try:
        connection = check_connection(answer.result.get("connection"))
    except Malformed as exc:
        return waiting.GuestAnswer(waiting.MALFORMED, str(exc))
    return waiting.GuestAnswer(answer.state, {**answer.result, "connection": connection})


def _activate(instance_id: str, result: dict[str, Any]) -> dict[str, Any]:
    """BUILD -> ACTIVE with prepare's answer, once checked by `prepare_answer`."""
    now = time.time()
    records().transition(instance_id, Status.ACTIVE, [Status.BUILD], "verify",
                         active_at=now, connection=result.get("connection") or {}, **audit_counts(result))
    secrets.drop(redis_client(), instance_id)
    record = records().get(instance_id)
    assert record is not None
    if record.status in SERVING:
        # From now on its guest's heartbeats keep its status; silence counts from here.
        heartbeats.watch(redis_client(), instance_id, now, only_new=True)
    else:
        raise InstanceNotBuilding(f"instance {instance_id} is {record.status.value}: not made ACTIVE")
    return summary(record)


def audit_counts(answer: dict[str, Any]) -> dict[str, int]:
    """The guest's own count of prepare deliveries and applications, for the record."""
    if not isinstance(answer, dict):
        return {}
    counts = {f"prepare_{name}": check_count(answer, name) for name in ("deliveries", "applied", "rolled_back")}
    return {name: count for name, count in counts.items() if count is not None}


def utc_datetime(epoch_s: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch_s, tz=dt.UTC)
