"""Prepare's answer, seen the moment the guest stores it.

`verify` looks for the answer with backoff (up to ``berth_verify_backoff_cap_s`` between looks),
so as not to hold a worker slot; a long prepare would be noticed up to that much late. Each
taskmanager node therefore also listens, in a thread of its main process, for the publish that
Celery's Redis backend makes when a guest stores a result (``celery-task-meta-<id>.guest.prepare.*``),
and makes the instance ACTIVE at once when it is the answer its current provisioning waits for.
The transition is the same compare-and-set `verify` uses (BUILD -> ACTIVE, once, whoever is
first); failures and timeouts stay `verify`'s to decide.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis

from berth.ids import GUEST_TASK_MARK, RESULT_KEY_PREFIX, prepare_task_id
from berth.steps import ThreadStep

log = logging.getLogger("berth.answers")
CHANNEL_PATTERN = f"{RESULT_KEY_PREFIX}*.{GUEST_TASK_MARK}.prepare.*"


def on_answer(channel: str, data: Any) -> bool:
    """Activate the instance whose prepare this answer is; True if it became ACTIVE here."""
    from tasks.records import Status
    from tasks.runtime import records
    from tasks.taskmanager import _activate

    task_id = channel.removeprefix(RESULT_KEY_PREFIX)
    instance_id = task_id.partition(f".{GUEST_TASK_MARK}.")[0]
    try:
        meta = json.loads(data)
    except (TypeError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("status") != "SUCCESS" or not isinstance(meta.get("result"), dict):
        return False
    record = records().get(instance_id)
    if record is None or record.status is not Status.BUILD or record.get("prepare_sent_at") is None:
        return False
    if task_id != prepare_task_id(instance_id, record["request_id"]):
        return False  # another request's prepare: not what this provisioning waits for
    _activate(instance_id, meta["result"])
    return True


class PrepareAnswers(ThreadStep):
    """Worker step: the listening thread (PSUBSCRIBE on the result backend)."""

    requires = ("tasks.nodes:OwnUnacked",)
    thread_name = "berth-prepare-answers"

    def start(self, worker: Any) -> None:
        url = worker.app.conf.result_backend

        def run() -> None:
            while not self.stopping.is_set():
                try:
                    client = redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=2.0)
                    pubsub = client.pubsub(ignore_subscribe_messages=True)
                    pubsub.psubscribe(CHANNEL_PATTERN)
                    while not self.stopping.is_set():
                        message = pubsub.get_message(timeout=1.0)
                        if message and message.get("type") == "pmessage":
                            try:
                                on_answer(str(message["channel"]), message["data"])
                            except Exception:  # noqa: BLE001 - verify decides whatever this could not
                                log.exception("prepare answer on %s not applied; verify will", message["channel"])
                except redis.RedisError as exc:
                    log.warning("listening for prepare answers failed (%s); retrying", exc)
                    self.stopping.wait(1.0)

        self.run_thread(run)
