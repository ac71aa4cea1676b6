"""Prepare's answer, seen the moment the guest stores it.

`verify` looks for the answer with backoff (up to ``berth_verify_backoff_cap_s`` between looks),
so as not to hold a worker slot; a long prepare would be noticed up to that much late. Each
taskmanager node therefore also listens, in a thread of its main process, for the publish that
Celery's Redis backend makes when a guest stores a result (``celery-task-meta-<id>.guest.prepare.*``),
and makes the instance ACTIVE at once when it is the answer its current provisioning waits for.
The transition is the same compare-and-set `verify` uses (BUILD -> ACTIVE, once, whoever is
first); failures and timeouts stay `verify`'s to decide.

The same listener hears every other guest answer too, and hands each to `tasks.outcomes`, which
tells Flower what became of that message.
"""

from __future__ import annotations

import logging
from fnmatch import fnmatchcase
from typing import Any

import redis

import tasks.outcomes as outcomes
import tasks.waiting as waiting
from berth.errors import Malformed
from berth.ids import GUEST_TASK_MARK, INSTANCE_ID_RE, RESULT_KEY_PREFIX, instance_of, prepare_task_id
from berth.records import Status
from berth.steps import ThreadStep
from berth.tls import redis_from_url
from berth.untrusted import MAX_ANSWER_BYTES, RateLimitedLog, as_text, one_line
from tasks.runtime import records
from tasks.taskmanager import _activate, prepare_answer

log = logging.getLogger("berth.answers")
CHANNEL_PATTERN = f"{RESULT_KEY_PREFIX}*.{GUEST_TASK_MARK}.prepare.*"
_complaints = RateLimitedLog(log)


def on_answer(channel: bytes | str, data: bytes | str) -> bool:
    """Activate the instance whose prepare this answer is; True if it became ACTIVE here.

    Channel and data are a guest's bytes: anything odd is left to `verify`, which reads the
    stored answer itself and fails the instance when it is malformed.
    """
    try:
        task_id = as_text(channel, "channel").removeprefix(RESULT_KEY_PREFIX)
    except Malformed:
        return False
    instance_id = instance_of(task_id)
    if INSTANCE_ID_RE.fullmatch(instance_id) is None or len(data) > MAX_ANSWER_BYTES:
        return False
    answer = waiting.parse(data)
    if answer is None or not answer.ok or not (answer := prepare_answer(answer)).ok:
        return False
    record = records().get(instance_id)
    if record is None or record.status is not Status.BUILD or record.get("prepare_sent_at") is None:
        return False
    if task_id != prepare_task_id(instance_id, record["request_id"]):
        return False  # another request's prepare: not what this provisioning waits for
    _activate(instance_id, answer.result)
    return True


def listen(url: str, stopping: Any) -> None:
    """Apply prepare answers as they are published, until ``stopping`` is set or the connection fails."""
    # Bytes, not text: a guest may publish anything on its own channels.
    client = redis_from_url(url, socket_connect_timeout=2.0)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        # Every guest answer (prepare's among them): see `_apply`.
        pubsub.psubscribe(outcomes.ANSWER_PATTERN)
        while not stopping.is_set():
            message = pubsub.get_message(timeout=1.0)
            if message and message.get("type") == "pmessage":
                _apply(message["channel"], message["data"])
    finally:
        pubsub.close()
        client.close()


def _apply(channel: bytes, data: bytes) -> None:
    source = one_line(channel, 120)
    if fnmatchcase(bytes(channel).decode("utf-8", "replace"), CHANNEL_PATTERN):
        try:
            on_answer(channel, data)
        except Exception as exc:  # noqa: BLE001 - verify decides whatever this could not
            _complaints.warn(source, "prepare answer on %s not applied (%s: %s); verify will", source,
                             type(exc).__name__, one_line(exc, 200))
    try:
        outcomes.on_published(channel, data)
    except Exception as exc:  # noqa: BLE001 - the sweeper tells it at the message's expiry
        _complaints.warn(f"outcome {source}", "outcome of the answer on %s not told (%s: %s)", source,
                         type(exc).__name__, one_line(exc, 200))


class PrepareAnswers(ThreadStep):
    """Worker step: the listening thread (PSUBSCRIBE on the result backend)."""

    requires = ("tasks.nodes:OwnUnacked",)
    thread_name = "berth-prepare-answers"

    def start(self, worker: Any) -> None:
        url = worker.app.conf.result_backend

        def run() -> None:
            while not self.stopping.is_set():
                try:
                    listen(url, self.stopping)
                except redis.RedisError as exc:
                    # A flood past the broker's pub/sub output limit also lands here: it drops
                    # this connection, and the listener subscribes again.
                    log.warning("listening for prepare answers failed (%s); listening again", exc)
                    self.stopping.wait(1.0)

        self.run_thread(run)
