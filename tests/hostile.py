"""A hostile guest for tests: one guest's credentials and key (what `guest-env` prints), and nothing else.

It does what a guest whose VM was taken over can do: take the messages on its own queue, answer
them with whatever it likes, and write anything into every key and channel its broker user may
write. Everything goes through its own Redis user on the real broker, so the broker's ACLs apply.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import redis

from berth.ids import (
    deadletter_key,
    guest_task_prefix,
    heartbeat_key,
    queue_lists,
    record_key,
    result_key,
    unacked_keys,
)

# Answers a message: (task name, task id) -> the bytes of the result document to store, or None.
Answerer = Callable[[str, str], "bytes | None"]


def result_document(status: str, result: Any) -> bytes:
    """A Celery result document as the Redis backend stores it."""
    return json.dumps({"status": status, "result": result, "traceback": None, "children": []}).encode()


class HostileGuest:
    def __init__(self, env: dict[str, str]) -> None:
        self.instance_id = env["BERTH_INSTANCE_ID"]
        self.env = env
        self.broker = redis.Redis.from_url(env["CELERY_BROKER_URL"], socket_timeout=10, socket_connect_timeout=2)
        self.results = redis.Redis.from_url(env["CELERY_RESULT_BACKEND"], socket_timeout=10,
                                            socket_connect_timeout=2)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.answered: list[tuple[str, str]] = []

    # --- what it may write -----------------------------------------------------------------

    def result_key(self, suffix: bytes | str) -> bytes:
        """A result key of its own: any bytes after its prefix."""
        tail = suffix if isinstance(suffix, bytes) else suffix.encode()
        return result_key(guest_task_prefix(self.instance_id)).encode() + tail

    def list_keys(self) -> list[str]:
        """Every list key its user may write (queue and priority lists, dead letters, heartbeats)."""
        return [*queue_lists(self.instance_id), deadletter_key(self.instance_id), heartbeat_key(self.instance_id)]

    def other_keys(self) -> list[str]:
        """Its ack-emulation keys."""
        return list(unacked_keys(self.instance_id).values())

    def answer(self, task_id: str, document: bytes) -> None:
        """Store a result for one of its task ids and publish it, as Celery's backend does."""
        key = result_key(task_id)
        self.results.set(key, document)
        self.results.publish(key, document)

    # --- acting as the guest agent -----------------------------------------------------------

    def take(self, timeout_s: float = 1.0) -> tuple[str, str] | None:
        """The (task name, task id) of the next message on its queue, or None."""
        got = self.broker.brpop(queue_lists(self.instance_id), timeout=timeout_s)
        if got is None:
            return None
        headers = json.loads(got[1])["headers"]
        return str(headers["task"]), str(headers["id"])

    def serve(self, answerer: Answerer) -> None:
        """Answer every message on its queue with ``answerer``, in a thread, until `stop`."""
        def run() -> None:
            while not self._stop.is_set():
                try:
                    message = self.take(0.2)
                except redis.ConnectionError:
                    continue
                if message is None:
                    continue
                document = answerer(*message)
                self.answered.append(message)
                if document is not None:
                    self.answer(message[1], document)

        self._thread = threading.Thread(target=run, name="hostile-guest", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.broker.close()
        self.results.close()


def pong(instance_id: str, version: str = "hostile") -> bytes:
    return result_document("SUCCESS", {"instance_id": instance_id, "version": version})


def prepared(instance_id: str) -> bytes:
    return result_document("SUCCESS", {"instance_id": instance_id, "connection": {"datastore": "noop"},
                                       "deliveries": 1, "applied": 1, "rolled_back": 0})


def printable(text: str) -> bool:
    """Nothing a terminal would act on: every character printable, or a newline."""
    return all(c.isprintable() or c == "\n" for c in text)


def keys_naming(client: redis.Redis, instance_id: str) -> list[tuple[int, bytes]]:
    """Every key, in every database, whose name holds the instance id, but its audit record."""
    found = []
    for db in range(16):
        client.execute_command("SELECT", db)
        found += [(db, k) for k in client.scan_iter(count=1000)
                  if instance_id.encode() in k and k != record_key(instance_id).encode()]
    client.execute_command("SELECT", 0)
    return found
