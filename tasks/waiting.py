"""Reading a guest's answer without holding a worker slot for long.

A guest answers by storing a Celery result; the Redis backend also PUBLISHes it on a channel
named after the result key. `wait_for_result` subscribes, then reads the key (so an answer
stored in between is not missed), then waits for the publish at most ``timeout_s``. The answer
is a guest's, so it is read as hostile bytes (`berth.untrusted`): bounded, parsed with limits,
its strings escaped; garbage is a MALFORMED answer, never an exception.
Long waits are never done here: the calling task retries with a countdown instead. Short ones
only when nothing else waits for the slot (`Broker.queue_empty`): under a backlog, a step that
would wait for a guest retries with a countdown at once and lets the next message in.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Any

import redis
from celery import states

from berth.errors import Malformed
from berth.ids import result_key
from berth.untrusted import MAX_ANSWER_BYTES, clean, decode_json, one_line, read_bounded

FINAL_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})


# What a guest stored that is not a Celery result document within the limits (berth.untrusted).
MALFORMED = "MALFORMED"


@dataclass(frozen=True)
class GuestAnswer:
    """A guest's final answer: its state and its result, every string in it escaped."""

    state: str
    result: Any

    @property
    def ok(self) -> bool:
        return self.state == "SUCCESS"

    def error(self) -> str:
        """The guest's error as one line, 'Type: message' (Celery stores exceptions as a dict)."""
        if self.state == MALFORMED:
            return one_line(f"malformed answer: {self.result}")
        if isinstance(self.result, dict) and "exc_type" in self.result:
            message = self.result.get("exc_message")
            if isinstance(message, (list, tuple)):
                message = " ".join(str(m) for m in message)
            return one_line(f"{self.result['exc_type']}: {message}")
        return one_line(self.result)


def parse(raw: bytes | str | None) -> GuestAnswer | None:
    """The final answer in a stored or published result document; None while there is none yet.

    Anything that is not a result document within the limits is a MALFORMED answer (its
    result says why, in one line): final, and never an exception.
    """
    if raw is None:
        return None
    try:
        meta = decode_json(raw, "answer", MAX_ANSWER_BYTES)
        if not isinstance(meta, dict):
            raise Malformed("answer is not a JSON object")
        status = meta.get("status")
        if not isinstance(status, str) or status not in states.ALL_STATES:
            raise Malformed(f"answer has no known status ({one_line(status, 40)})")
    except Malformed as exc:
        return GuestAnswer(MALFORMED, str(exc))
    if status not in FINAL_STATES:
        return None
    return GuestAnswer(status, clean(meta.get("result")))


def peek(client: redis.Redis, task_id: str) -> GuestAnswer | None:
    """The final answer for task_id if there is one, without waiting.

    ``client`` returns bytes (`tasks.runtime.raw_result_client`): the answer is a guest's, and
    is read with its size bounded on the broker.
    """
    try:
        raw = read_bounded(client, result_key(task_id), MAX_ANSWER_BYTES, "answer")
    except Malformed as exc:
        return GuestAnswer(MALFORMED, str(exc))
    return parse(raw)


# Per connection pool of a client: a client on the same server with a pool of its own, for
# subscribing. A PubSub closes its connection when done; taken from the client's own pool, that
# connection would have to be opened again (and authenticated) by the client's next command.
_subscribers: weakref.WeakKeyDictionary[Any, redis.Redis] = weakref.WeakKeyDictionary()


def _subscriber(client: redis.Redis) -> redis.Redis:
    pool = client.connection_pool
    subscriber = _subscribers.get(pool)
    if subscriber is None:
        subscriber = redis.Redis(connection_pool=type(pool)(connection_class=pool.connection_class,
                                                            **pool.connection_kwargs))
        _subscribers[pool] = subscriber
    return subscriber


def wait_for_result(client: redis.Redis, task_id: str, timeout_s: float) -> GuestAnswer | None:
    """The final answer for task_id, waiting at most timeout_s for it to be published."""
    if timeout_s <= 0:
        return peek(client, task_id)
    key = result_key(task_id)
    pubsub = _subscriber(client).pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(key)
        answer = peek(client, task_id)
        deadline = time.monotonic() + timeout_s
        while answer is None and (left := deadline - time.monotonic()) > 0:
            message = pubsub.get_message(timeout=left)
            if message and message.get("type") == "message":
                data = message["data"]
                # A publish too large to parse: read what is stored instead, bounded.
                answer = parse(data) if len(data) <= MAX_ANSWER_BYTES else peek(client, task_id)
        return answer
    finally:
        pubsub.close()
