"""The guests of many instances played by one process: a benchmark harness, not a product feature.

    .venv/bin/python -m bench.fleet --prefix wave --count 1000     # broker: CELERY_BROKER_URL

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
the next BRPOP: one round trip per message. SIGTERM (or ``stop_event``) stops it within
``BRPOP_TIMEOUT_S``; it then prints its counts as one JSON line.
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
from collections import Counter
from collections.abc import Iterable
from typing import Any, Protocol

import redis

from berth import __version__
from berth.ids import PRIORITY_STEPS, queue_lists, result_key

BRPOP_TIMEOUT_S = 1
RESULT_EXPIRES_S = 86400
# Precomputed BRPOP commands, each starting at another instance: no guest is always served last.
ROTATIONS = 8
READY_LINE = "fleet ready"


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
    args, kwargs, _embed = json.loads(body)
    return str(headers["task"]), str(headers["id"]), list(args), dict(kwargs), headers.get("expires")


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
        now = dt.datetime.now(dt.UTC)
        if expired(expires, now):
            self.counts[f"expired:{task}"] += 1
            return []
        result = answer(task, task_id, kwargs)
        if result is None:
            self.counts[f"ignored:{task}"] += 1
            return []
        self.counts[task] += 1
        key, meta = result_key(task_id), result_meta(task_id, result, now)
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


def run_fleet(broker_url: str, instance_ids: list[str], stop_event: StopEvent,
              ready: threading.Event | None = None) -> dict[str, int]:
    """Play the guests of instance_ids until stop_event is set; return what was answered, by task."""
    if not instance_ids:
        raise ValueError("no instances to play")
    fleet = Fleet(broker_url, instance_ids)
    if ready is not None:
        ready.set()
    return fleet.serve(stop_event)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet")
    parser.add_argument("--prefix", required=True, help="instances <prefix>-0 .. <prefix>-<count-1>")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--broker-url", default=os.environ.get("CELERY_BROKER_URL"))
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
    fleet = Fleet(args.broker_url, instance_ids(args.prefix, args.count))
    print(f"{READY_LINE}: {args.count} instances ({args.prefix}-0 ..), {len(fleet.brpops[0])} bytes per BRPOP",
          flush=True)
    counts = fleet.serve(stop)
    print(json.dumps({"fleet_counts": counts}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
