"""Polling baseline: from the guest's prepare finishing to the instance being seen ACTIVE.

    .venv/bin/python -m bench.polling [--instances 20] [--seed 5]

A private stack (embedded broker, taskmanager with 2 worker processes) and a real guest agent
per instance (boot driver ``none``, ``noop`` datastore whose prepare takes a random 0-5 s, the
same draws for both). All instances are provisioned at once. Berth sees ACTIVE when its
``verify`` step finds the guest's answer (``active_at``). In the same run, a Trove-style loop
per instance, started when the request is sent, looks for the guest's answer every 5 s
(Trove's ``usage_sleep_time``) and notes when it first sees it. Both are measured from the
moment the guest stored its answer (the result's ``date_done``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
import threading
import time
from typing import Any

from bench.common import BenchStack, summary_ms
from bench.latency import start_guests

TROVE_POLL_S = 5.0


def trove_poll(client: Any, key: str, seen: dict[str, float], name: str, stop: threading.Event) -> None:
    """Trove's taskmanager: check, sleep usage_sleep_time, check again."""
    while not stop.is_set():
        raw = client.get(key)
        if raw and json.loads(raw).get("status") == "SUCCESS":
            seen[name] = time.time()
            return
        stop.wait(TROVE_POLL_S)


def run(instances: int = 20, seed: int = 5) -> dict[str, Any]:
    stack = BenchStack()
    stop = threading.Event()
    try:
        stack.start_taskmanager()
        from berth.ids import prepare_task_id, result_key
        from tasks.runtime import records, redis_client
        from tests.helpers import wait_until
        from workflows import provision_chain

        rng = random.Random(seed)
        ids = [f"poll-{n}" for n in range(instances)]
        guests, request_ids = start_guests(stack, ids)
        trove_seen: dict[str, float] = {}
        pollers = []
        for instance_id in ids:
            provision_chain(instance_id, request_id=request_ids[instance_id], datastore="noop", boot="none",
                            config={"prepare_seconds": round(rng.uniform(0.0, 5.0), 3)}).apply_async()
            key = result_key(prepare_task_id(instance_id, request_ids[instance_id]))
            poller = threading.Thread(target=trove_poll, args=(redis_client(), key, trove_seen, instance_id, stop),
                                      daemon=True)
            poller.start()
            pollers.append(poller)

        def all_active() -> bool:
            return all((r := records().get(i)) is not None and r.status.value == "ACTIVE" for i in ids)

        wait_until(all_active, 120, interval_s=0.2, message="all ACTIVE")
        for poller in pollers:
            poller.join(timeout=TROVE_POLL_S + 5)
        berth, trove = [], []
        for instance_id in ids:
            record = records().get(instance_id)
            assert record is not None
            meta = json.loads(redis_client().get(result_key(prepare_task_id(instance_id,
                                                                            request_ids[instance_id]))) or "{}")
            done = dt.datetime.fromisoformat(meta["date_done"]).replace(tzinfo=dt.UTC).timestamp()
            berth.append(max(0.0, record["active_at"] - done))
            trove.append(max(0.0, trove_seen[instance_id] - done))
        result: dict[str, Any] = {"berth": summary_ms(berth), "trove_5s_poll": summary_ms(trove),
                                  "instances": instances}
        result["ratio_p50"] = result["trove_5s_poll"]["p50_ms"] / max(result["berth"]["p50_ms"], 1e-3)
        return result
    finally:
        stop.set()
        stack.close()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.polling")
    parser.add_argument("--instances", type=int, default=20)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(run(args.instances, args.seed), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
