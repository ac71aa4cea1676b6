"""What became of each message sent to a guest, told to Flower on the guest's behalf.

Guests send no Celery events (their broker users may not publish any), so Flower hears only the
``task-sent`` of a guest message and would show it PENDING forever. The taskmanager speaks for
what it observed instead, once per message:

- SUCCESS (``task-succeeded``): the guest's answer, checked as the taskmanager checks it (a pong
  from this instance's guest, prepare's connection details); a guest API answer;
- FAILURE (``task-failed``): the guest's error, or an answer that fails its check;
- EXPIRED (``task-expired``): no answer by the message's expiry plus ``berth_outcome_grace_s``;
  the guest received it after its expiry; the instance failed GUEST_UNREACHABLE or PREPARE_TIMEOUT;
- REVOKED (``task-revoked``): dropped unanswered by a delete, or by the purge of a failed instance.

Celery's event state turns an event type it does not know into a state of that name
(``task-expired`` -> EXPIRED), which sorts after PENDING, so a late ``task-sent`` never hides it.

Every message `tasks.channel.publish` sends is noted in a ledger on the store (`expect`). Whoever
takes a message off the ledger (one ZREM) tells its outcome (`settle`): the listener of guests'
answers (tasks/answers.py) the moment a guest stores one, the sweeper (`OutcomeSweeper`) at its
expiry, a failed instance's or a delete's purge for what was still waiting. So no message is told
twice with two outcomes, and the first outcome decided is the one told: an event that could not
be sent (broker away) goes back on the ledger with its outcome and is sent again by the sweeper.
Nothing here ever fails the work it observes. A result shown is masked (`tasks.masking.masked`)
and bounded.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from celery import current_task
from celery.signals import celeryd_after_setup
from celery.utils.saferepr import saferepr

import tasks.waiting as waiting
from berth.errors import Malformed
from berth.guestapi import check_connection, check_pong
from berth.ids import GUEST_TASK_MARK, RESULT_KEY_PREFIX, guest_task_prefix, instance_of
from berth.steps import ThreadStep
from berth.untrusted import MAX_ANSWER_BYTES, as_text, one_line
from tasks.celery_app import app
from tasks.masking import REPR_MAX, masked
from tasks.runtime import raw_result_client, redis_client, setting

log = logging.getLogger("berth.outcomes")

# Sorted set: task id of each guest message whose outcome is not told yet -> when it is due.
LEDGER_KEY = "berth:guest-messages"
# Hash: task id -> {"name": task name} and, once decided but not yet told, its outcome.
META_KEY = "berth:guest-messages:meta"
# Results of guest messages, as the Redis result backend publishes them.
ANSWER_PATTERN = f"{RESULT_KEY_PREFIX}*.{GUEST_TASK_MARK}.*"
SWEEP_BATCH = 500

SUCCESS, FAILURE, REVOKED, EXPIRED = "SUCCESS", "FAILURE", "REVOKED", "EXPIRED"
EVENT_TYPES = {SUCCESS: "task-succeeded", FAILURE: "task-failed", REVOKED: "task-revoked", EXPIRED: "task-expired"}


@dataclass(frozen=True)
class Outcome:
    state: str
    detail: str

    def fields(self) -> dict[str, Any]:
        """The event's fields, as a worker would have sent them (Flower shows them)."""
        if self.state == SUCCESS:
            return {"result": self.detail, "runtime": None}
        if self.state == FAILURE:
            return {"exception": self.detail, "traceback": ""}
        # Flower serves only Celery's own task fields: why it expired or was dropped goes in ``exception``.
        return {"exception": self.detail, "terminated": False, "signum": None, "expired": self.state == EXPIRED}


# --- Deciding ---------------------------------------------------------------------------------

def _answer_problem(name: str, instance_id: str, result: Any) -> str | None:
    """What is wrong with a successful answer, as the taskmanager checks it; None if nothing."""
    if name == "guest.ping" and check_pong(result, instance_id) is None:
        return "not a pong from this instance's guest"
    if name == "guest.prepare":
        try:
            check_connection(result.get("connection") if isinstance(result, dict) else None)
        except Malformed as exc:
            return str(exc)
    return None


def judge(task_id: str, name: str, answer: waiting.GuestAnswer | None) -> Outcome | None:
    """The outcome a guest's answer shows; None while there is no answer."""
    if answer is None:
        return None
    if answer.state == REVOKED:
        # The guest's worker refuses a message past its expiry (it revokes nothing else).
        return Outcome(EXPIRED, "the guest received it after its expiry and did not run it")
    if not answer.ok:
        return Outcome(FAILURE, answer.error())
    problem = _answer_problem(name, instance_of(task_id), answer.result)
    if problem:
        return Outcome(FAILURE, one_line(f"malformed answer: {problem}", 300))
    return Outcome(SUCCESS, saferepr(masked(answer.result), maxlen=REPR_MAX))


# --- The ledger -------------------------------------------------------------------------------

def expect(task_id: str, name: str, expires_at: float) -> None:
    """Note a message just sent to a guest: its outcome is told by whoever observes it first."""
    try:
        with redis_client().pipeline() as pipe:
            pipe.zadd(LEDGER_KEY, {task_id: expires_at + float(setting("outcome_grace_s"))})
            pipe.hset(META_KEY, task_id, json.dumps({"name": name}))
            pipe.execute()
    except Exception as exc:  # noqa: BLE001 - the console never fails the work it shows
        log.warning("outcome of %s will not be shown (ledger unreachable: %s)", task_id, one_line(exc, 200))


def unexpect(task_id: str) -> None:
    """Take a message off the ledger that was never sent after all (its publish failed)."""
    try:
        with redis_client().pipeline() as pipe:
            pipe.zrem(LEDGER_KEY, task_id)
            pipe.hdel(META_KEY, task_id)
            pipe.execute()
    except Exception as exc:  # noqa: BLE001 - the sweeper tells it EXPIRED at its expiry then
        log.warning("%s stays on the outcome ledger (%s)", task_id, one_line(exc, 200))


def settle(task_id: str, outcome: Outcome) -> bool:
    """Tell Flower a message's outcome, if this caller is the first to take it off the ledger.

    An outcome decided earlier whose event could not be sent wins over ``outcome``. Returns
    whether an event was sent here.
    """
    client = redis_client()
    with client.pipeline() as pipe:
        pipe.zrem(LEDGER_KEY, task_id)
        pipe.hget(META_KEY, task_id)
        taken, raw = pipe.execute()
    if not taken:
        return False
    meta = json.loads(raw) if raw else {}
    decided = Outcome(meta["state"], meta["detail"]) if "state" in meta else outcome
    name = str(meta.get("name") or "guest")
    try:
        _send(task_id, name, decided)
    except Exception as exc:  # noqa: BLE001 - sent again by the sweeper; never fails the work
        log.warning("outcome %s of %s not sent (%s: %s); sent again in %g s", decided.state, task_id,
                    type(exc).__name__, one_line(exc, 200), setting("outcome_sweep_s"))
        with client.pipeline() as pipe:
            pipe.hset(META_KEY, task_id, json.dumps({"name": name, **asdict(decided)}))
            pipe.zadd(LEDGER_KEY, {task_id: time.time() + float(setting("outcome_sweep_s"))})
            pipe.execute()
        return False
    client.hdel(META_KEY, task_id)
    return True


def name_of(task_id: str) -> str:
    meta = redis_client().hget(META_KEY, task_id)
    return str(json.loads(meta).get("name") or "guest") if meta else "guest"


def observed(task_id: str, answer: waiting.GuestAnswer | None, otherwise: Outcome | None = None) -> bool:
    """Settle a message from its answer (or ``otherwise`` when there is none)."""
    outcome = judge(task_id, name_of(task_id), answer) or otherwise
    return outcome is not None and settle(task_id, outcome)


def waiting_ids(instance_id: str) -> list[str]:
    """The instance's messages whose outcome is not told yet."""
    match = f"{guest_task_prefix(instance_id)}*"  # instance ids hold no glob character
    return [str(member) for member, _ in redis_client().zscan_iter(LEDGER_KEY, match=match, count=1000)]


def close(instance_id: str, state: str, reason: str) -> int:
    """Settle every message of the instance still waiting: its answer if the guest gave one, else
    ``state`` (EXPIRED or REVOKED) with ``reason``; how many events were sent. Never raises."""
    told = 0
    try:
        for task_id in waiting_ids(instance_id):
            answer = waiting.peek(raw_result_client(), task_id)
            told += observed(task_id, answer, Outcome(state, reason))
    except Exception as exc:  # noqa: BLE001 - the sweeper tells the rest at their expiry
        log.warning("instance %s: outcomes not all told (%s: %s)", instance_id, type(exc).__name__,
                    one_line(exc, 200))
    return told


def sweep(now: float | None = None) -> int:
    """Settle every message past its expiry (and grace): its answer, else EXPIRED; how many."""
    client = redis_client()
    due = client.zrangebyscore(LEDGER_KEY, "-inf", time.time() if now is None else now, start=0, num=SWEEP_BATCH)
    expired = Outcome(EXPIRED, "no answer by its expiry")
    return sum(observed(str(task_id), waiting.peek(raw_result_client(), str(task_id)), expired) for task_id in due)


def on_published(channel: bytes | str, data: bytes | str) -> bool:
    """A guest stored an answer (the result backend's publish): settle that message from it."""
    try:
        task_id = as_text(channel, "channel").removeprefix(RESULT_KEY_PREFIX)
    except Malformed:
        return False
    if len(data) > MAX_ANSWER_BYTES or redis_client().zscore(LEDGER_KEY, task_id) is None:
        return False
    return observed(task_id, waiting.parse(data))


# --- Telling Flower ---------------------------------------------------------------------------

_thread_origin: str | None = None


@celeryd_after_setup.connect
def _speak_as(sender: str | None = None, **_: Any) -> None:
    """This worker's node name, for what its threads (the listener, the sweeper) observe."""
    global _thread_origin  # noqa: PLW0603 - one node name per process, set once at start
    _thread_origin = sender


def origin() -> str | None:
    """The node that speaks: the worker running the current task, or the one running the threads."""
    request = getattr(current_task, "request", None) if current_task else None
    return getattr(request, "hostname", None) or _thread_origin


def _send(task_id: str, name: str, outcome: Outcome) -> None:
    with app.events.default_dispatcher(hostname=origin()) as dispatcher:
        dispatcher.send(EVENT_TYPES[outcome.state], uuid=task_id, name=name, observed_by="taskmanager",
                        **outcome.fields())
    log.info("guest message %s (%s): %s", task_id, name, outcome.state)


class OutcomeSweeper(ThreadStep):
    """Worker step: every ``berth_outcome_sweep_s``, tell the outcome of messages past their expiry."""

    thread_name = "berth-outcome-sweeper"

    def start(self, worker: Any) -> None:
        def run() -> None:
            while not self.stopping.wait(float(setting("outcome_sweep_s"))):
                try:
                    sweep()
                except Exception as exc:  # noqa: BLE001 - the next sweep tries again
                    log.warning("outcome sweep failed (%s: %s)", type(exc).__name__, one_line(exc, 200))

        self.run_thread(run)
