"""The guests of many instances played by one process: a benchmark harness, not a product feature.

    .venv/bin/python -m bench.fleet --prefix wave --count 1000     # broker: CELERY_BROKER_URL

On Redis (`Fleet`):

Plays the guests of ``<prefix>-0 .. <prefix>-<count-1>`` on the control plane's (admin) broker
connection: one BRPOP over every list of every guest queue (kombu's plain list ``guest.<id>``,
where default-priority messages land, and its priority lists), then the answer a real guest
would give, stored as Celery's Redis backend stores it (SET with an expiry, then PUBLISH on the
key's channel, which `tasks.waiting` subscribes to):

- ``guest.ping``: ``{"instance_id", "version", "pid"}``;
- ``guest.prepare`` (the ``noop`` datastore, applied at once): ``{"instance_id", "prepare_id",
  "connection", "deliveries": 1, "applied": 1, "rolled_back": 0}``.

It checks no signature and keeps no journal or ack-emulation keys; like a real guest it runs no
message past its expiry (it stores nothing for one). Each answer goes out in the same write as
the next BRPOP: one round trip per message.

On RabbitMQ (`RabbitFleet`, an ``amqp://`` broker URL): one AMQP connection and channel that
declares every instance's queue (durable, of ``BERTH_QUEUE_TYPE``: create_queue declares it again,
the same way) and consumes all of them, ``PREFETCH`` messages per queue; the same answers are
stored in the result backend (``CELERY_RESULT_BACKEND``, a Redis: SET and PUBLISH), the
messages read in one turn answered in one pipelined round trip, then acknowledged together.

SIGTERM (or ``stop_event``) stops either within ``BRPOP_TIMEOUT_S``; it then prints its counts
as one JSON line.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any, Protocol

import redis

from berth import __version__
from berth.ids import PRIORITY_STEPS, guest_queue, queue_lists, result_key

BRPOP_TIMEOUT_S = 1
RESULT_EXPIRES_S = 86400
# Precomputed BRPOP commands, each starting at another instance: no guest is always served last.
ROTATIONS = 8
READY_LINE = "fleet ready"
# RabbitMQ: unacknowledged messages per guest queue, and at most this many answered per round trip.
PREFETCH = 4
BATCH = 200


class StopEvent(Protocol):
    def is_set(self) -> bool: ...


def instance_ids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{n}" for n in range(count)]


def brpop_keys(ids: list[str], start: int = 0) -> list[str]:
    """Every queue list of every instance, in kombu's order: all priority-0 lists first, then 3, 6, 9.

    BRPOP pops from the first non-empty key it is given, as kombu's consumer does.
    """
    rotated = ids[start:] + ids[:start]
    lists = [queue_lists(i) for i in rotated]
    return [per_instance[step] for step in range(len(PRIORITY_STEPS)) for per_instance in lists]


def decode(raw: bytes) -> tuple[str, str, list[Any], dict[str, Any], str | None]:
    """kombu's Redis envelope -> (task name, task id, args, kwargs, expires) of a protocol-2 message."""
    envelope = json.loads(raw)
    headers = envelope["headers"]
    body: Any = envelope["body"]
    if envelope.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    return decode_body(headers, body)


def decode_body(headers: dict[str, Any], body: str | bytes) -> tuple[str, str, list[Any], dict[str, Any], str | None]:
    """A protocol-2 message's headers and JSON body -> (task name, task id, args, kwargs, expires)."""
    args, kwargs, _embed = json.loads(body)
    return str(headers["task"]), str(headers["id"]), list(args), dict(kwargs), headers.get("expires")


def reply(task: str, task_id: str, kwargs: dict[str, Any], expires: str | None,
          counts: Counter[str]) -> tuple[str, str] | None:
    """(result key, result meta) answering one message, or None for an expired or unknown one."""
    now = dt.datetime.now(dt.UTC)
    if expired(expires, now):
        counts[f"expired:{task}"] += 1
        return None
    result = answer(task, task_id, kwargs)
    if result is None:
        counts[f"ignored:{task}"] += 1
        return None
    counts[task] += 1
    return result_key(task_id), result_meta(task_id, result, now)


def expired(expires: str | None, now: dt.datetime) -> bool:
    if not expires:
        return False
    when = dt.datetime.fromisoformat(expires)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when <= now


def answer(task: str, task_id: str, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """What the real guest's task returns, or None for a task this harness does not play."""
    instance_id = kwargs.get("instance_id")
    if task == "guest.ping":
        return {"instance_id": instance_id, "version": __version__, "pid": os.getpid()}
    if task == "guest.prepare":
        users = [u.get("name") for u in kwargs.get("users") or [] if isinstance(u, dict)]
        return {"instance_id": instance_id, "prepare_id": task_id,
                "connection": {"datastore": kwargs.get("datastore", "noop"), "users": users,
                               "databases": list(kwargs.get("databases") or [])},
                "deliveries": 1, "applied": 1, "rolled_back": 0}
    return None


def result_meta(task_id: str, result: Any, now: dt.datetime) -> str:
    """The JSON Celery's Redis backend stores for a successful task."""
    return json.dumps({"status": "SUCCESS", "result": result, "traceback": None, "children": [],
                       "date_done": now.isoformat(), "task_id": task_id})


class Fleet:
    def __init__(self, broker_url: str, ids: list[str]) -> None:
        self.client = redis.Redis.from_url(broker_url, socket_connect_timeout=5.0)
        self.conn: Any = self.client.connection_pool.get_connection()
        self.conn.connect()
        step = max(1, len(ids) // ROTATIONS)
        self.brpops = [self.pack("BRPOP", *brpop_keys(ids, start), BRPOP_TIMEOUT_S)
                       for start in range(0, max(1, len(ids)), step)][:ROTATIONS]
        self.turn = 0
        self.counts: Counter[str] = Counter()

    def pack(self, *args: Any) -> bytes:
        return b"".join(bytes(chunk) for chunk in self.conn.pack_command(*args))

    def reply_for(self, raw: bytes) -> list[bytes]:
        """The SET and PUBLISH that answer one message (nothing for an expired or unknown one)."""
        try:
            task, task_id, _args, kwargs, expires = decode(raw)
        except (ValueError, KeyError, TypeError):
            self.counts["undecodable"] += 1
            return []
        found = reply(task, task_id, kwargs, expires, self.counts)
        if found is None:
            return []
        key, meta = found
        return [self.pack("SET", key, meta, "EX", RESULT_EXPIRES_S), self.pack("PUBLISH", key, meta)]

    def serve(self, stop: StopEvent) -> dict[str, int]:
        """Pop and answer until stop is set; each answer is sent with the next BRPOP."""
        pending: list[bytes] = []
        while True:
            if stop.is_set():
                self.flush(pending)
                break
            self.turn = (self.turn + 1) % len(self.brpops)
            self.conn.send_packed_command([*pending, self.brpops[self.turn]])
            for _ in pending:
                self.conn.read_response()
            popped = self.conn.read_response()
            pending = self.reply_for(popped[1]) if popped else []
        self.conn.disconnect()
        return dict(self.counts)

    def flush(self, pending: Iterable[bytes]) -> None:
        commands = list(pending)
        if commands:
            self.conn.send_packed_command(commands)
            for _ in commands:
                self.conn.read_response()


class RabbitFleet:
    """The same guests on RabbitMQ: one channel consuming every guest queue, answers in the store."""

    def __init__(self, broker_url: str, store_url: str, ids: list[str], queue_type: str = "classic") -> None:
        from kombu.connection import Connection

        self.store = redis.Redis.from_url(store_url, socket_connect_timeout=5.0)
        self.conn = Connection(broker_url, connect_timeout=10, heartbeat=0)
        self.conn.ensure_connection(max_retries=3)
        self.channel: Any = self.conn.channel()
        # Per consumer (a quorum queue takes no global QoS).
        self.channel.basic_qos(0, PREFETCH, False)
        arguments = {"x-queue-type": "quorum"} if queue_type == "quorum" else {}
        for instance_id in ids:
            name = guest_queue(instance_id)
            self.channel.queue_declare(name, durable=True, auto_delete=False, arguments=arguments)
            self.channel.basic_consume(name, callback=self.on_message)
        self.counts: Counter[str] = Counter()
        self.pending: list[tuple[str, str]] = []
        self.last_tag: int | None = None

    def on_message(self, message: Any) -> None:
        self.last_tag = int(message.delivery_tag)
        try:
            headers = dict(message.headers or {})
            task, task_id, _args, kwargs, expires = decode_body(headers, message.body)
        except (ValueError, KeyError, TypeError):
            self.counts["undecodable"] += 1
            return
        found = reply(task, task_id, kwargs, expires, self.counts)
        if found is not None:
            self.pending.append(found)

    def drain(self, timeout_s: float) -> bool:
        try:
            self.conn.drain_events(timeout=timeout_s)
        except TimeoutError:  # socket.timeout
            return False
        return True

    def flush(self) -> None:
        """Store the answers read so far (one round trip), then acknowledge every message read."""
        if self.pending:
            with self.store.pipeline(transaction=False) as pipe:
                for key, meta in self.pending:
                    pipe.set(key, meta, ex=RESULT_EXPIRES_S)
                    pipe.publish(key, meta)
                pipe.execute()
            self.pending = []
        if self.last_tag is not None:
            self.channel.basic_ack(self.last_tag, multiple=True)
            self.last_tag = None

    def serve(self, stop: StopEvent) -> dict[str, int]:
        while not stop.is_set():
            if self.drain(BRPOP_TIMEOUT_S):
                until = time.monotonic() + 0.005
                while len(self.pending) < BATCH and time.monotonic() < until and self.drain(0.001):
                    pass
            self.flush()
        self.conn.release()
        return dict(self.counts)


def make_fleet(broker_url: str, instance_ids: list[str], store_url: str | None = None,
               queue_type: str | None = None) -> Fleet | RabbitFleet:
    """The fleet for the broker URL's kind (RabbitMQ: its answers in ``store_url``, a Redis)."""
    if broker_url.split(":", 1)[0] in ("amqp", "amqps", "pyamqp"):
        store = store_url or os.environ.get("CELERY_RESULT_BACKEND")
        if not store:
            raise ValueError("on RabbitMQ the fleet needs the store: CELERY_RESULT_BACKEND or --store-url")
        return RabbitFleet(broker_url, store, instance_ids,
                           queue_type or os.environ.get("BERTH_QUEUE_TYPE", "classic"))
    return Fleet(broker_url, instance_ids)


def run_fleet(broker_url: str, instance_ids: list[str], stop_event: StopEvent,
              ready: threading.Event | None = None) -> dict[str, int]:
    """Play the guests of instance_ids until stop_event is set; return what was answered, by task."""
    if not instance_ids:
        raise ValueError("no instances to play")
    fleet = make_fleet(broker_url, instance_ids)
    if ready is not None:
        ready.set()
    return fleet.serve(stop_event)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet")
    parser.add_argument("--prefix", required=True, help="instances <prefix>-0 .. <prefix>-<count-1>")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--broker-url", default=os.environ.get("CELERY_BROKER_URL"))
    parser.add_argument("--store-url", default=os.environ.get("CELERY_RESULT_BACKEND"),
                        help="RabbitMQ: the Redis where answers go (default: CELERY_RESULT_BACKEND)")
    args = parser.parse_args(argv)
    if not args.broker_url:
        parser.error("no broker: set CELERY_BROKER_URL or pass --broker-url")
    if args.count < 1:
        parser.error("--count must be at least 1")
    stop = threading.Event()

    def on_term(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    fleet = make_fleet(args.broker_url, instance_ids(args.prefix, args.count), args.store_url)
    how = f"{len(fleet.brpops[0])} bytes per BRPOP" if isinstance(fleet, Fleet) else "one AMQP consumer per queue"
    print(f"{READY_LINE}: {args.count} instances ({args.prefix}-0 ..), {how}",
          flush=True)
    counts = fleet.serve(stop)
    print(json.dumps({"fleet_counts": counts}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
