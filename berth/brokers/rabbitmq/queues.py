"""Guest queues on RabbitMQ, over AMQP: declared, checked, purged, removed.

A guest queue is the durable queue ``guest.ID`` (a quorum queue when the settings say so). The
taskmanager publishes to it by name through the default exchange, ``mandatory`` and with
publisher confirms: a publish after the queue is gone comes back as an error instead of
vanishing. No exchange or binding of its own: nothing to leak per guest but the queue.

One AMQP connection per process (a prefork child builds its own), shared by its threads under
a lock; a channel error (a passive declare of a missing queue closes the channel) opens a new
channel, a connection error a new connection on the next call.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from amqp.exceptions import ChannelError, NotFound
from kombu.connection import Connection

from berth.ids import guest_queue
from berth.tls import amqp_ssl, process_ca, uses_tls

T = TypeVar("T")
QUEUE_TYPES = ("classic", "quorum")


class Topology:
    def __init__(self, broker_url: str, queue_type: str = "classic") -> None:
        if queue_type not in QUEUE_TYPES:
            raise ValueError(f"queue type {queue_type!r}: expected one of {', '.join(QUEUE_TYPES)}")
        self.broker_url, self.queue_type = broker_url, queue_type
        self._lock = threading.RLock()
        self._pid = 0
        self._conn: Connection | None = None
        self._channel: Any = None

    def _chan(self) -> Any:
        if self._pid != os.getpid() or self._conn is None:
            self._conn = Connection(self.broker_url, connect_timeout=4, heartbeat=0,
                                    transport_options={"max_retries": 2},
                                    ssl=amqp_ssl(process_ca()) if uses_tls(self.broker_url) else False)
            self._channel, self._pid = None, os.getpid()
        if self._channel is None or not getattr(self._channel, "is_open", True):
            self._conn.ensure_connection(max_retries=2)
            self._channel = self._conn.connection.channel()
        return self._channel

    def _run(self, op: Callable[[Any], T]) -> T:
        with self._lock:
            try:
                return op(self._chan())
            except ChannelError:
                self._channel = None  # the broker closed the channel: the next call opens another
                raise
            except Exception:
                self._reset()
                raise

    def _reset(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        if conn is not None:
            try:
                conn.release()
            except Exception:  # noqa: BLE001 - it is being dropped anyway
                pass

    def arguments(self) -> dict[str, Any]:
        return {"x-queue-type": "quorum"} if self.queue_type == "quorum" else {}

    def declare(self, instance_id: str) -> None:
        name = guest_queue(instance_id)

        self._run(lambda ch: ch.queue_declare(name, durable=True, auto_delete=False, arguments=self.arguments()))

    def inspect(self, queue: str) -> tuple[int, int] | None:
        """(messages ready, consumers) of a queue, or None when it does not exist."""
        try:
            _, ready, consumers = self._run(lambda ch: ch.queue_declare(queue, passive=True))
        except NotFound:
            return None
        return int(ready), int(consumers)

    def purge(self, queue: str) -> int:
        try:
            return int(self._run(lambda ch: ch.queue_purge(queue)) or 0)
        except NotFound:
            return 0

    def remove(self, instance_id: str) -> bool:
        """Delete the queue and what waits in it; True if it existed."""
        name = guest_queue(instance_id)
        existed = self.inspect(name) is not None
        try:
            self._run(lambda ch: ch.queue_delete(name))
        except NotFound:
            pass
        return existed

    def close(self) -> None:
        with self._lock:
            self._reset()
