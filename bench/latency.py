"""Provision -> ACTIVE with a live guest, against a bare Celery round trip in the same run.

    .venv/bin/python -m bench.latency [--instances 200] [--round-trips 300] [--wave 20] [--broker redis|rabbitmq]

A private stack (its own broker, a taskmanager with 2 worker processes). The baseline:
``celery.accumulate`` (a no-op every worker has) sent to the taskmanager and its result read,
one at a time: ``--round-trips`` before the first provisioning, and one more just before each
provisioning, so that the baseline sees the same conditions as Berth. Berth: per instance, a
real guest agent (boot driver ``none``, started and ready before the request, ``noop``
datastore: zero prepare time), then the provisioning chain sent and its last result read, one
at a time: the same send -> result shape as the baseline. Guests start ``--wave`` at a time, in
parallel, and stop once their instance is ACTIVE.

On RabbitMQ (``--broker rabbitmq``: a private node, the records and answers in a Redis beside
it) the baseline is the same ``celery.accumulate`` round trip, through the same node; each
guest's queue is declared before its agent starts (a guest may not declare it, and consumes
only a queue that exists), which create_queue then declares again, as it always does.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import uuid
from typing import Any

from bench.common import BenchStack, broker_option, summary_ms
from berth import roundtrips

STEP_FIELDS = ["created_at", "queue_created_at", "booted_at", "ping_started_at", "guest_ready_at",
               "prepare_sent_at", "active_at"]


def bare_round_trips(app: Any, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        app.send_task("celery.accumulate", args=[1]).get(timeout=10)
        times.append(time.perf_counter() - started)
    return times


def broker_round_trips(count: int) -> dict[str, Any]:
    """One read (PING) and one write (SET) at a time on the store: what a write waits for.

    The embedded Redis fsyncs its AOF before it answers a write (``appendfsync always``), so
    every sequential write round trip carries an fsync; Berth's steps make several, a bare task
    few. On Redis the store is the broker; beside RabbitMQ it holds the records and results.
    """
    from tasks.runtime import redis_client

    client = redis_client()
    reads, writes = [], []
    for n in range(count):
        started = time.perf_counter()
        client.ping()
        reads.append(time.perf_counter() - started)
        started = time.perf_counter()
        client.set("bench:latency:write", n)
        writes.append(time.perf_counter() - started)
    client.delete("bench:latency:write")
    return {"read_ping": summary_ms(reads), "write_set": summary_ms(writes)}


def amqp_round_trips(count: int) -> dict[str, Any]:
    """RabbitMQ: a passive declare (a read) and a persistent publish to a durable queue waiting
    for its publisher confirm (a write: what every Berth publish waits for), one at a time."""
    from amqp import Message
    from kombu.connection import Connection

    from tasks import app

    queue = "bench.latency.confirms"
    with Connection(app.conf.broker_url, transport_options={"confirm_publish": True}) as conn:
        channel = conn.channel()
        channel.queue_declare(queue, durable=True, auto_delete=False)
        reads, writes = [], []
        for n in range(count):
            started = time.perf_counter()
            channel.queue_declare(queue, passive=True)
            reads.append(time.perf_counter() - started)
            started = time.perf_counter()
            channel.basic_publish(Message(str(n), delivery_mode=2), exchange="", routing_key=queue, mandatory=True)
            writes.append(time.perf_counter() - started)
        channel.queue_delete(queue)
    return {"read_passive_declare": summary_ms(reads), "write_publish_confirm": summary_ms(writes)}


def start_guests(stack: BenchStack, ids: list[str]) -> tuple[list[Any], dict[str, str]]:
    """Live guests for ids, with their users and keys ahead of create_queue (as `guest-env` gives)."""
    from tasks.runtime import broker, guest_env
    from tests.helpers import guest_command, wait_until

    guests, request_ids = [], {}
    for instance_id in ids:
        request_ids[instance_id] = uuid.uuid4().hex
        if stack.on_rabbitmq:
            broker().declare_guest_queue(instance_id)  # the guest consumes only a queue that exists
        broker().mint_guest(instance_id, request_ids[instance_id])
        env = {**os.environ, **guest_env(instance_id, request_ids[instance_id])}
        guests.append(stack.start(guest_command(instance_id), f"guest-{instance_id}", env=env))
    for guest in guests:
        wait_until(lambda: " ready." in guest.log(), 120, interval_s=0.1, message="guest ready")  # noqa: B023
    return guests, request_ids


def per_task(totals: dict[str, dict[str, int]], instances: int) -> dict[str, Any]:
    """Per task name: runs per provisioning, and per run its round trips and slot time (ms).

    ``celery.accumulate`` is the bare task of the baseline; ``provisioning`` sums the steps.
    """
    tasks = {name: {**roundtrips.per_run(figures), "runs_per_provisioning": figures.get("runs", 0) / instances}
             for name, figures in sorted(totals.items())}
    steps = [figures for name, figures in totals.items() if name.startswith("taskmanager.")]
    whole = {kind: sum(f.get(kind, 0) for f in steps) / instances for kind in (*roundtrips.KINDS, "runs")}
    whole["slot_ms"] = sum(f.get("slot_us", 0) for f in steps) / instances / 1000
    return {"tasks": tasks, "provisioning": whole}


def run(instances: int = 200, round_trips: int = 300, wave: int = 20, broker: str = "redis") -> dict[str, Any]:
    stack = BenchStack(broker)
    try:
        os.environ[roundtrips.ENV] = "1"  # the taskmanager counts each task's round trips and slot time
        stack.start_taskmanager()
        from tasks import app
        from tasks.runtime import records, redis_client
        from workflows import provision_chain

        bare_round_trips(app, 20)  # warm up connections and the worker's pool
        redis_client().delete(roundtrips.COUNTS_KEY)
        bare = bare_round_trips(app, round_trips)
        berth: list[float] = []
        # Each segment of a provisioning: "created" runs from the send to the record's creation.
        steps: dict[str, list[float]] = {name.removesuffix("_at"): [] for name in STEP_FIELDS}
        for first in range(0, instances, wave):
            ids = [f"lat-{n}" for n in range(first, min(instances, first + wave))]
            guests, request_ids = start_guests(stack, ids)
            for instance_id in ids:
                # The baseline again, in the same conditions (these guests running, the records so far).
                bare += bare_round_trips(app, 1)
                started, sent_at = time.perf_counter(), time.time()
                provision_chain(instance_id, request_id=request_ids[instance_id], datastore="noop",
                                boot="none").apply_async().get(timeout=30)
                berth.append(time.perf_counter() - started)
                record = records().get(instance_id)
                assert record is not None and record.status.value == "ACTIVE", record
                steps["created"].append(record["created_at"] - sent_at)
                for a, b in zip(STEP_FIELDS, STEP_FIELDS[1:], strict=False):
                    steps[b.removesuffix("_at")].append(record[b] - record[a])
            for guest in guests:
                guest.signal(signal.SIGTERM)  # all at once: each takes a second or two to shut down
            for guest in guests:
                guest.stop(timeout_s=5)
                stack.procs.remove(guest)
        result: dict[str, Any] = {
            "bare_round_trip": summary_ms(bare), "provision_to_active": summary_ms(berth),
            "broker": broker, "broker_round_trip": broker_round_trips(200),
            "steps_p50_ms": {name: summary_ms(values)["p50_ms"] for name, values in steps.items()}}
        result["per_task"] = per_task(roundtrips.read(redis_client()), instances)
        if stack.on_rabbitmq:
            result["amqp_round_trip"] = amqp_round_trips(200)
        ratio = result["provision_to_active"]["p50_ms"] / result["bare_round_trip"]["p50_ms"]
        result["ratio_p50"] = ratio
        result["target"] = {"what": "Berth p50 <= 6 x the bare round trip p50", "met": ratio <= 6.0}
        return result
    finally:
        stack.close()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.latency")
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--round-trips", type=int, default=300)
    parser.add_argument("--wave", type=int, default=20)
    broker_option(parser)
    args = parser.parse_args()
    print(json.dumps(run(args.instances, args.round_trips, args.wave, args.broker), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
