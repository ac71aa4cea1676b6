"""Guest footprint: a guest agent's resident memory and time from process start to first pong,
against a bare ``celery worker --pool solo`` (bench/bareapp.py) on the same broker.

    .venv/bin/python -m bench.footprint [--runs 5] [--broker redis|rabbitmq]

Both are started with the guest's own flags (guest/launch.py: solo pool, no gossip, mingle or
heartbeat), one at a time, alternating; from the moment the process is started, a ping is sent every 50 ms (each
expiring after 1 s) until one is answered: that is the time to first pong. Memory is the
process's VmRSS right after its first pong (solo pool: the whole worker is one process).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
import uuid
from typing import Any

from bench.common import BENCH_BROKERS, BenchStack, rss_kib


def worker_flags(hostname: str) -> list[str]:
    """The guest agent's own worker flags (guest/launch.py), with another hostname."""
    from guest.launch import agent_command

    flags = agent_command("x")[8:]
    flags[flags.index("--hostname") + 1] = hostname
    return flags


def first_pong(proc: Any, send: Any, started: float, timeout_s: float = 60.0) -> float:
    """Seconds from start to the first answered ping."""
    deadline = started + timeout_s
    pending: list[Any] = []
    while time.perf_counter() < deadline:
        pending.append(send())
        until = time.perf_counter() + 0.05
        while time.perf_counter() < until:
            for result in pending:
                if result.ready():
                    return time.perf_counter() - started
            time.sleep(0.002)
        if not proc.alive():
            raise RuntimeError(f"worker exited: {proc.log()[-2000:]}")
    raise TimeoutError("no pong")


def run_guest(stack: BenchStack, n: int) -> tuple[float, int]:
    from berth.ids import guest_task_prefix
    from berth.keys import guest_key
    from guest.launch import agent_command
    from tasks import channel
    from tasks.runtime import broker, guest_env

    instance_id, request_id = f"fp-{n}", uuid.uuid4().hex
    broker().declare_guest_queue(instance_id)
    broker().mint_guest(instance_id, request_id)
    env = {**os.environ, **guest_env(instance_id, request_id)}
    key = guest_key(instance_id, request_id)
    command = agent_command(instance_id)

    def send() -> Any:
        return channel.publish(instance_id, "guest.ping", kwargs={"instance_id": instance_id},
                              task_id=f"{guest_task_prefix(instance_id)}fp.{uuid.uuid4().hex[:12]}",
                              expires=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1), key=key)

    started = time.perf_counter()
    proc = stack.start(command, f"guest-{n}", env=env)
    try:
        seconds = first_pong(proc, send, started)
        return seconds, rss_kib(proc.pid)
    finally:
        proc.stop(timeout_s=5)
        stack.procs.remove(proc)


def run_bare(stack: BenchStack, n: int) -> tuple[float, int]:
    from bench.bareapp import app as bare
    from tests.helpers import celery

    queue = f"bare-{n}"
    started = time.perf_counter()
    proc = stack.start(celery("-A", "bench.bareapp", "worker", "-Q", queue, *worker_flags(f"bare-{n}@%h")),
                       f"bare-{n}")
    try:
        seconds = first_pong(proc, lambda: bare.send_task("bare.ping", queue=queue, expires=1.0), started)
        return seconds, rss_kib(proc.pid)
    finally:
        proc.stop(timeout_s=5)
        stack.procs.remove(proc)


def run(runs: int = 5, broker: str = "redis") -> dict[str, Any]:
    stack = BenchStack(broker)
    try:
        guest: list[tuple[float, int]] = []
        bare: list[tuple[float, int]] = []
        run_bare(stack, -1)  # warm the page cache for both
        run_guest(stack, -1)
        for n in range(runs):
            bare.append(run_bare(stack, n))
            guest.append(run_guest(stack, n))

        def med(values: list[tuple[float, int]], i: int) -> float:
            return float(statistics.median(v[i] for v in values))

        result: dict[str, Any] = {
            "bare_worker": {"start_to_pong_ms": med(bare, 0) * 1000, "rss_mib": med(bare, 1) / 1024},
            "guest_agent": {"start_to_pong_ms": med(guest, 0) * 1000, "rss_mib": med(guest, 1) / 1024},
            "runs": runs, "broker": stack.kind}
        result["ratio_time"] = med(guest, 0) / med(bare, 0)
        result["ratio_rss"] = med(guest, 1) / med(bare, 1)
        result["target"] = {"what": "guest time to first pong and RSS each <= 1.1 x a bare solo worker",
                            "met": result["ratio_time"] <= 1.1 and result["ratio_rss"] <= 1.1}
        return result
    finally:
        stack.close()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.footprint")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--broker", choices=BENCH_BROKERS, default="redis")
    args = parser.parse_args()
    print(json.dumps(run(args.runs, args.broker), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
