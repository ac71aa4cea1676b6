"""Reading a guest's answer without holding a worker slot for long.

A guest answers by storing a Celery result; the Redis backend also PUBLISHes it on a channel
named after the result key. `wait_for_result` subscribes, then reads the key (so an answer
stored in between is not missed), then waits for the publish at most ``timeout_s``.
Long waits are never done here: the calling task retries with a countdown instead. Short ones
only when nothing else waits for the slot (`nothing_queued`): under a backlog, a step that
would wait for a guest retries with a countdown at once and lets the next message in.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from berth.ids import kombu_lists, result_key

FINAL_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
TASKMANAGER_QUEUE = "taskmanager"


def nothing_queued(client: redis.Redis, queue: str = TASKMANAGER_QUEUE) -> bool:
    """True when no message waits in the queue, at any priority (one round trip)."""
    with client.pipeline(transaction=False) as pipe:
        for name in kombu_lists(queue):
            pipe.llen(name)
        return not any(pipe.execute())


@dataclass(frozen=True)
class GuestAnswer:
    state: str
    result: Any

    @property
    def ok(self) -> bool:
        return self.state == "SUCCESS"

    def error(self) -> str:
        """The guest's error as 'Type: message' (Celery stores exceptions as a dict)."""
        if isinstance(self.result, dict) and "exc_type" in self.result:
            message = self.result.get("exc_message")
            if isinstance(message, (list, tuple)):
                message = " ".join(str(m) for m in message)
            return f"{self.result['exc_type']}: {message}"
        return str(self.result)


def _parse(raw: str | bytes | None) -> GuestAnswer | None:
    if not raw:
        return None
    meta = json.loads(raw)
    if meta.get("status") not in FINAL_STATES:
        return None
    return GuestAnswer(meta["status"], meta.get("result"))


def peek(client: redis.Redis, task_id: str) -> GuestAnswer | None:
    """The final answer for task_id if there is one, without waiting."""
    return _parse(client.get(result_key(task_id)))


def wait_for_result(client: redis.Redis, task_id: str, timeout_s: float) -> GuestAnswer | None:
    """The final answer for task_id, waiting at most timeout_s for it to be published."""
    if timeout_s <= 0:
        return peek(client, task_id)
    key = result_key(task_id)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(key)
        answer = peek(client, task_id)
        deadline = time.monotonic() + timeout_s
        while answer is None and (left := deadline - time.monotonic()) > 0:
            message = pubsub.get_message(timeout=left)
            if message and message.get("type") == "message":
                answer = _parse(message["data"])
        return answer
    finally:
        pubsub.close()
