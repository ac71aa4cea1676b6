"""Fast-fail precision: with no guest at all, how long after its ping deadline is an instance FAILED?

    .venv/bin/python -m bench.fastfail [--instances 20] [--broker redis|rabbitmq]

A private stack (its own broker, taskmanager with 2 worker processes). For each ping deadline
(2 s and 5 s), ``--instances`` provisionings with boot driver ``none`` and no guest are sent at
once; each ends FAILED / GUEST_UNREACHABLE. The figure is ``failed_at - ping_started_at -
deadline`` (the record's own timestamps: the deadline runs from the first ping), p50/p99.
Trove's equivalent is its 1,800 s ``usage_timeout`` checked every 5 s (``usage_sleep_time``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bench.common import BenchStack, broker_option, summary_ms


def run(instances: int = 20, deadlines: tuple[float, ...] = (2.0, 5.0), broker: str = "redis") -> dict[str, Any]:
    stack = BenchStack(broker)
    try:
        stack.start_taskmanager()
        from tasks.runtime import records
        from tests.helpers import wait_until
        from workflows import provision_chain

        result: dict[str, Any] = {}
        for deadline in deadlines:
            ids = [f"ff{int(deadline)}-{n}" for n in range(instances)]
            for instance_id in ids:
                provision_chain(instance_id, datastore="noop", boot="none", ping_deadline_s=deadline).apply_async()

            def failed(ids: list[str] = ids) -> list[Any]:
                found = [records().get(i) for i in ids]
                done = [r for r in found if r is not None and r.status.value in ("FAILED", "ACTIVE")]
                return done if len(done) == len(ids) else []

            done: list[Any] = wait_until(lambda: failed(), deadline + 60, interval_s=0.2, message="all FAILED")
            assert all(r.status.value == "FAILED" and r.reason == "GUEST_UNREACHABLE" for r in done), \
                [(r.instance_id, r.status, r.reason) for r in done]
            late = [r["failed_at"] - r["ping_started_at"] - deadline for r in done]
            result[f"deadline_{deadline:g}s"] = summary_ms(late)
        worst = max(v["p99_ms"] for v in result.values())
        result["broker"] = broker
        result["target"] = {"what": "time to FAILED minus the deadline, p99 <= 1 s", "met": worst <= 1000.0}
        return result
    finally:
        stack.close()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fastfail")
    parser.add_argument("--instances", type=int, default=20)
    broker_option(parser)
    args = parser.parse_args()
    print(json.dumps(run(args.instances, broker=args.broker), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
