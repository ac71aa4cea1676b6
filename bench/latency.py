"""Provision -> ACTIVE with a live guest, against a bare Celery round trip in the same run.

    .venv/bin/python -m bench.latency [--instances N]

Starts its own embedded broker, a taskmanager with 2 slots and, per instance, a guest agent
(boot driver `none`, started before the provisioning, `noop` datastore, zero prepare time).
Prints p50/p99 of both and their ratio. Figures are only comparable within one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def guest_ready(guest: Any) -> Callable[[], bool]:
    return lambda: " ready." in guest.log()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.latency")
    parser.add_argument("--instances", type=int, default=30)
    parser.add_argument("--round-trips", type=int, default=300)
    args = parser.parse_args()

    from berth.broker import EmbeddedRedis

    root = Path(tempfile.mkdtemp(prefix="berth-bench-"))
    broker = EmbeddedRedis(root / "redis").start()
    os.environ.update(CELERY_BROKER_URL=broker.url, CELERY_RESULT_BACKEND=broker.url, BERTH_HOME=str(root / "home"))
    from tests.helpers import Proc, celery, guest_command, wait_until

    taskmanager = Proc(celery("-A", "tasks", "worker", "-Q", "taskmanager", "-c", "2", "-n", "bench@%h",
                              "-l", "WARNING"), root / "taskmanager.log")
    guests: list[Proc] = []
    try:
        from tasks import app, credentials
        from tasks.runtime import records, redis_client, result_client
        from workflows import provision_chain

        wait_until(lambda: app.control.inspect(timeout=1).ping(), 60, message="taskmanager up")
        bare = []
        for _ in range(args.round_trips):
            started = time.perf_counter()
            app.send_task("celery.accumulate", args=[1]).get(timeout=10)
            bare.append(time.perf_counter() - started)
        berth = []
        for n in range(args.instances):
            instance_id, request_id = f"bench-{n}", uuid.uuid4().hex
            # A live guest before the request: its user and key exist ahead of create_queue
            # (which mints the same user again), as an operator's `guest-env` would give them.
            credentials.mint(instance_id, request_id, redis_client(), result_client())
            env = {**os.environ, **credentials.guest_env(instance_id, request_id, app.conf.broker_url,
                                                         app.conf.result_backend)}
            guest = Proc(guest_command(instance_id), root / f"guest-{n}.log", env=env)
            guests.append(guest)
            wait_until(guest_ready(guest), 30, message="guest ready")
            provision_chain(instance_id, request_id=request_id, datastore="noop", boot="none"
                            ).apply_async().get(timeout=30)
            record = records().get(instance_id)
            assert record is not None
            berth.append(record["active_at"] - record["created_at"])
            if os.environ.get("BENCH_STEPS"):
                steps = ["created_at", "queue_created_at", "booted_at", "ping_started_at", "guest_ready_at",
                         "prepare_sent_at", "active_at"]
                print(" ".join(f"{b.removesuffix('_at')}+{(record[b] - record[a]) * 1000:.1f}"
                               for a, b in zip(steps, steps[1:], strict=False)))
            guest.stop()
        for name, values in (("bare round trip", bare), ("provision -> ACTIVE", berth)):
            print(f"{name:<20} n={len(values):<4} p50={statistics.median(values) * 1000:7.1f} ms  "
                  f"p99={percentile(values, 0.99) * 1000:7.1f} ms")
        print(f"ratio p50: {statistics.median(berth) / statistics.median(bare):.1f} x the bare round trip")
        return 0
    finally:
        for guest in guests:
            guest.stop()
        taskmanager.stop()
        broker.stop()


if __name__ == "__main__":
    sys.exit(main())
