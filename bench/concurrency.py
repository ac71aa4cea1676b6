"""A wave of provisionings at once, against the bare task throughput of the same taskmanager.

    .venv/bin/python -m bench.concurrency [--instances 1000] [--probe-priority 0] [--no-events]
                                          [--broker redis|rabbitmq]

A private stack (its own broker, a taskmanager with 2 worker processes) and one fleet process
(`bench.fleet`) that plays every instance's guest. In one run:

1. bare: ``instances`` no-op tasks (``celery.accumulate``) sent at once, from the first send to
   the last result stored (the worker's ``date_done``): tasks/s;
2. probe (idle): a ``celery.accumulate`` every 100 ms for 2 s, send -> result, from a process
   of its own (`ProbeProcess`);
3. wave: ``instances`` provisionings (datastore ``noop``, boot ``none``: the fleet answers) sent
   at once, the probe running all along; provisionings/s = instances / (last ``active_at`` - t0),
   p50/p99 time to ACTIVE, how many ACTIVE/FAILED.

Targets: provisionings/s >= 1/6 of bare tasks/s; probe p99 during the wave <= 50 ms; the
taskmanager's CPU (its main process and pool, user + system) per provisioning <= 6 x per bare task.
Prints one JSON object. Also: the taskmanager's run time per task name (from its task events),
the deepest the taskmanager queue's lists got, and which list a message lands in (kombu's Redis
priorities).

On RabbitMQ (``--broker rabbitmq``: a private node, records and results in a Redis beside it)
the same three measures run through the node; the fleet consumes every guest queue over AMQP
and stores its answers in that Redis. The depth of the taskmanager's queues is their count of
ready messages (a passive declare each per poll); "broker time" is then the Redis store's. There
are no priority lists: the chains' steps have a queue of their own (``taskmanager.steps``), and
the probe goes to ``taskmanager`` (both read from the management API and reported).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import threading
import time
import uuid
from bisect import bisect
from collections import Counter, defaultdict
from typing import Any

# Milestones of an instance record, in chain order (epoch seconds).
MILESTONES = ("created_at", "queue_created_at", "booted_at", "ping_started_at", "guest_ready_at",
              "prepare_sent_at", "active_at")
READY_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
FINAL_STATUSES = frozenset({"ACTIVE", "FAILED", "SHUTDOWN", "UNKNOWN", "DELETING", "DELETED"})
TASK_QUEUE = "taskmanager"
PROBE_INTERVAL_S = 0.1
PROBE_TIMEOUT_S = 30.0
THROUGHPUT_RATIO_TARGET = 1 / 6
CPU_RATIO_TARGET = 6.0
PROBE_P99_TARGET_MS = 50.0
WAVE_DEADLINE_S = 600.0
POLL_S = 0.2


def epoch(iso: str) -> float:
    when = dt.datetime.fromisoformat(iso)
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


def seconds(values: list[float]) -> dict[str, float]:
    from bench.common import percentile

    if not values:
        return {"n": 0}
    return {"n": len(values), "p50_s": round(statistics.median(values), 3),
            "p99_s": round(percentile(values, 0.99), 3), "max_s": round(max(values), 3)}


def rounded(summary: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in summary.items()}


class Probe(threading.Thread):
    """A no-op task to the taskmanager every 100 ms, one at a time: send -> result, in seconds."""

    def __init__(self, app: Any, priority: int | None) -> None:
        super().__init__(name="probe", daemon=True)
        self.app, self.priority = app, priority
        self.stop = threading.Event()
        self.samples: list[float] = []
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.perf_counter()
            try:
                self.app.send_task("celery.accumulate", args=[1], priority=self.priority).get(timeout=PROBE_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - a lost probe is reported, not fatal
                self.errors.append(f"{type(exc).__name__}: {exc}")
            # A probe that timed out counts with its time so far: the percentiles are then lower bounds.
            self.samples.append(time.perf_counter() - started)
            self.stop.wait(max(0.0, started + PROBE_INTERVAL_S - time.perf_counter()))

    def finish(self) -> dict[str, Any]:
        from bench.common import summary_ms

        self.stop.set()
        self.join(PROBE_TIMEOUT_S + 5)
        out: dict[str, Any] = rounded(summary_ms(self.samples)) if self.samples else {"n": 0}
        out["errors_or_timeouts"] = len(self.errors)
        if self.errors:
            out["first_error"] = self.errors[0]
        return out


class TaskTimes(threading.Thread):
    """The taskmanager's run time per task name, from its task events (it sends them: celeryconfig)."""

    def __init__(self, app: Any) -> None:
        super().__init__(name="task-events", daemon=True)
        self.app = app
        self.ready = threading.Event()
        self.receiver: Any = None
        self.names: dict[str, str] = {}
        self.started: dict[str, float] = {}
        self.runs: dict[str, Counter[str]] = defaultdict(Counter)
        self.busy_s: dict[str, float] = defaultdict(float)
        self.max_s: dict[str, float] = defaultdict(float)
        self.lock = threading.Lock()

    def run(self) -> None:
        with self.app.connection() as conn:
            self.receiver = self.app.events.Receiver(conn, handlers={"*": self.on_event})
            self.ready.set()
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def on_event(self, event: dict[str, Any]) -> None:
        with self.lock:
            self._count(event)

    def _count(self, event: dict[str, Any]) -> None:
        kind, task_id = event.get("type", ""), event.get("uuid", "")
        if kind == "task-received":
            self.names[task_id] = event.get("name", "?")
        elif kind == "task-started":
            self.started[task_id] = float(event["timestamp"])
        elif kind in ("task-succeeded", "task-failed", "task-retried"):
            start = self.started.pop(task_id, None)
            name = self.names.get(task_id, "?")
            took = event.get("runtime") if kind == "task-succeeded" else None
            if took is None and start is not None:
                took = float(event["timestamp"]) - start
            self.runs[name][kind.removeprefix("task-")] += 1
            if took is not None:
                self.busy_s[name] += float(took)
                self.max_s[name] = max(self.max_s[name], float(took))

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per task name: runs by outcome, busy seconds (a slot held), mean and max run time."""
        out = {}
        with self.lock:
            runs_by_name = {name: Counter(runs) for name, runs in self.runs.items()}
        for name, runs in sorted(runs_by_name.items()):
            n = sum(runs.values())
            out[name] = {**dict(runs), "busy_s": round(self.busy_s[name], 3),
                         "mean_ms": round(self.busy_s[name] / n * 1000, 2) if n else 0.0,
                         "max_ms": round(self.max_s[name] * 1000, 1)}
        return out

    def reset(self) -> None:
        with self.lock:
            self.runs.clear()
            self.busy_s.clear()
            self.max_s.clear()

    def finish(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        if self.ident is not None:
            self.join(5)


class ProbeProcess:
    """The probe in a process of its own, started on the private stack's settings (inherited).

    This process reads the taskmanager's events (tens of thousands in a wave) and polls every
    record; a probe thread here would share its interpreter lock, and would measure this
    process's delays as much as the taskmanager's.
    """

    def __init__(self, priority: int | None) -> None:
        import subprocess

        args = [sys.executable, "-m", "bench.concurrency", "--probe-only"]
        if priority is not None:
            args += ["--probe-priority", str(priority)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline()
        if ready.strip() != "probing":
            raise RuntimeError(f"the probe process did not start: {ready!r}")

    def finish(self) -> dict[str, Any]:
        out, _ = self.proc.communicate(timeout=PROBE_TIMEOUT_S + 30)  # closing its stdin stops it
        found: dict[str, Any] = json.loads(out)
        return found


def probe_only(priority: int | None) -> int:
    """The probe process: warm up, say "probing", probe until stdin closes, print the figures."""
    from tasks import app

    for _ in range(5):
        app.send_task("celery.accumulate", args=[1]).get(timeout=10)
    probe = Probe(app, priority)
    probe.start()
    print("probing", flush=True)
    sys.stdin.read()
    print(json.dumps(probe.finish()))
    return 0


def run_probe(priority: int | None, duration_s: float) -> dict[str, Any]:
    probe = ProbeProcess(priority)
    time.sleep(duration_s)
    return probe.finish()


def wait_results(client: Any, task_ids: list[str], deadline_s: float) -> dict[str, float]:
    """task id -> when its result was stored (epoch), for those stored before the deadline."""
    from berth.ids import result_key

    pending, done = list(task_ids), {}
    deadline = time.monotonic() + deadline_s
    while pending and time.monotonic() < deadline:
        with client.pipeline(transaction=False) as pipe:
            for task_id in pending:
                pipe.get(result_key(task_id))
            raws = pipe.execute()
        for task_id, raw in zip(pending, raws, strict=True):
            meta = json.loads(raw) if raw else None
            if meta and meta.get("status") in READY_STATES:
                done[task_id] = epoch(meta["date_done"])
        pending = [t for t in pending if t not in done]
        if pending:
            time.sleep(0.05)
    return done


def bare_throughput(app: Any, client: Any, n: int) -> dict[str, Any]:
    """n no-op tasks sent at once: from the first send to the last result stored."""
    task_ids = [f"bare-{uuid.uuid4().hex}" for _ in range(n)]
    t0 = time.time()
    for task_id in task_ids:
        app.send_task("celery.accumulate", args=[1], task_id=task_id)
    sent = time.time()
    done = wait_results(client, task_ids, WAVE_DEADLINE_S)
    elapsed = (max(done.values()) - t0) if done else float("nan")
    return {"tasks": n, "done": len(done), "send_s": round(sent - t0, 3), "elapsed_s": round(elapsed, 3),
            "rate_per_s": round(len(done) / elapsed, 1) if done else 0.0}


def queue_list_names() -> list[str]:
    from kombu.transport.redis import PRIORITY_STEPS, Channel

    return [TASK_QUEUE if p == 0 else f"{TASK_QUEUE}{Channel.sep}{p}" for p in PRIORITY_STEPS]


def amqp_depth() -> Any:
    """RabbitMQ: a reader of the ready messages of each taskmanager queue (a passive declare each)."""
    from berth.brokers.rabbitmq.queues import Topology
    from tasks import app
    from tasks.runtime import taskmanager_queues

    topology = Topology(app.conf.broker_url, app.conf.berth_queue_type)

    def ready() -> dict[str, int]:
        return {queue: (found[0] if (found := topology.inspect(queue)) else 0) for queue in taskmanager_queues()}

    return ready


class Wave:
    """Submits the provisionings and follows their records (one pipelined round trip per poll)."""

    def __init__(self, client: Any, ids: list[str], depth: Any = None) -> None:
        """``depth``: RabbitMQ's reader of the taskmanager queue's depth (None: Redis, its lists)."""
        self.client, self.ids, self.depth = client, ids, depth
        self.status: dict[str, str] = {}
        self.depth_max: Counter[str] = Counter()
        self.t0 = 0.0
        self.submit_s = 0.0
        self.submit_errors: list[str] = []

    def submit(self) -> None:
        from workflows import provision_chain

        self.t0 = time.time()
        for instance_id in self.ids:
            try:
                provision_chain(instance_id, datastore="noop", boot="none", ping_deadline_s=300,
                                prepare_deadline_s=600).apply_async()
            except Exception as exc:  # noqa: BLE001 - reported with the figures
                self.submit_errors.append(f"{instance_id}: {type(exc).__name__}: {exc}")
        self.submit_s = time.time() - self.t0

    def poll(self) -> list[str]:
        """Read every unfinished record's status (and the queue's depth); the unfinished ids."""
        from berth.ids import record_key

        pending = [i for i in self.ids if self.status.get(i) not in FINAL_STATUSES]
        lists = queue_list_names() if self.depth is None else []
        if self.depth is not None:
            for queue, ready in self.depth().items():
                self.depth_max[f"{queue} (ready)"] = max(self.depth_max[f"{queue} (ready)"], ready)
        with self.client.pipeline(transaction=False) as pipe:
            for name in lists:
                pipe.llen(name)
            for instance_id in pending:
                pipe.hget(record_key(instance_id), "status")
            replies = pipe.execute()
        for name, depth in zip(lists, replies[:len(lists)], strict=True):
            label = name.replace("\x06\x16", "\\x06\\x16")
            self.depth_max[label] = max(self.depth_max[label], int(depth))
        for instance_id, status in zip(pending, replies[len(lists):], strict=True):
            self.status[instance_id] = str(status or "")
        return [i for i in pending if self.status[i] not in FINAL_STATUSES]

    def wait(self, deadline_s: float) -> float:
        deadline = time.monotonic() + deadline_s
        while self.poll() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        return time.time() - self.t0

    def records(self) -> dict[str, dict[str, Any]]:
        from berth.ids import record_key

        fields = ["status", "reason", "error", "ping_attempts", *MILESTONES]
        with self.client.pipeline(transaction=False) as pipe:
            for instance_id in self.ids:
                pipe.hmget(record_key(instance_id), fields)
            rows = pipe.execute()
        return {i: dict(zip(fields, row, strict=True)) for i, row in zip(self.ids, rows, strict=True)}

    def figures(self) -> dict[str, Any]:
        rows = self.records()
        active = [r for r in rows.values() if r["active_at"]]
        to_active = [float(r["active_at"]) - self.t0 for r in active]
        last = max(to_active) if to_active else float("nan")
        milestones = {m.removesuffix("_at"): round(statistics.median(float(r[m]) - self.t0 for r in active), 3)
                      for m in MILESTONES if active and all(r[m] for r in active)}
        statuses = Counter(str(r["status"]) for r in rows.values())
        failures = Counter(f"{r['reason']}: {str(r['error'])[:120]}" for r in rows.values() if r["status"] == "FAILED")
        return {"instances": len(self.ids), "submit_s": round(self.submit_s, 3),
                "submit_errors": len(self.submit_errors), "first_submit_error": next(iter(self.submit_errors), None),
                "last_active_s": round(last, 3),
                "provision_rate_per_s": round(len(self.ids) / last, 2) if active else 0.0,
                "statuses": dict(statuses), "active": len(active), "failed": statuses.get("FAILED", 0),
                "all_active": len(active) == len(self.ids), "time_to_active": seconds(to_active),
                "milestones_p50_s_from_t0": milestones,
                "ping_attempts": sum(int(r["ping_attempts"] or 0) for r in rows.values()),
                "failures": dict(failures.most_common(5)), "queue_depth_max": dict(self.depth_max)}


def redis_time(client: Any, wall_s: float, top: int = 8) -> dict[str, Any]:
    """Where the Redis's single thread spent the wave (INFO commandstats since CONFIG RESETSTAT):
    the broker's on Redis, the store's beside RabbitMQ."""
    stats = client.info("commandstats")
    rows = sorted(((name.removeprefix("cmdstat_"), v) for name, v in stats.items()), key=lambda r: -r[1]["usec"])
    busy_s = sum(v["usec"] for _, v in rows) / 1e6
    return {"busy_s": round(busy_s, 3), "busy_share_of_wave": round(busy_s / wall_s, 3) if wall_s else None,
            "top": {name: {"calls": v["calls"], "busy_s": round(v["usec"] / 1e6, 3),
                           "usec_per_call": round(v["usec_per_call"], 1)} for name, v in rows[:top]}}


def priority_facts() -> dict[str, Any]:
    """Where kombu's Redis transport puts a message, and which list its consumer reads first."""
    from kombu.transport.redis import PRIORITY_STEPS, Channel

    from tasks import app

    steps = list(PRIORITY_STEPS)

    def list_for(priority: int) -> str:
        step = steps[bisect(steps, priority) - 1]  # kombu's Channel.priority, then Channel._q_for_pri
        return TASK_QUEUE if not step else f"{TASK_QUEUE}{Channel.sep!r}{step}".replace("'", "")

    return {
        "priority_steps": list(PRIORITY_STEPS), "task_default_priority": app.conf.task_default_priority,
        "default_message_priority": 0,
        "list_of_priority": {str(p): list_for(p) for p in (0, 1, 3, 5, 6, 9)},
        "brpop_order": [list_for(p) for p in PRIORITY_STEPS],
        "note": "BRPOP takes from the first non-empty key in its order (priority 0 first). Normal messages "
                "(no priority: kombu's default 0) land in the plain list, FIFO: a priority-0 probe queues behind "
                "the whole backlog, a priority-9 one is read only once lists 0, 3 and 6 are empty.",
    }


def fleet_counts(log: str) -> dict[str, Any]:
    for line in reversed(log.splitlines()):
        if line.startswith('{"fleet_counts"'):
            return dict(json.loads(line)["fleet_counts"])
    return {"error": "fleet printed no counts", "log_tail": log[-500:]}


def targets(bare: dict[str, Any], wave: dict[str, Any], probe: dict[str, Any]) -> dict[str, Any]:
    ratio = wave["provision_rate_per_s"] / bare["rate_per_s"] if bare["rate_per_s"] else 0.0
    p99 = probe.get("p99_ms", float("inf"))
    per_task = bare.get("taskmanager_cpu_ms_per_task") or 0.0
    cpu_ratio = wave.get("taskmanager_cpu_ms_per_provisioning", 0.0) / per_task if per_task else float("inf")
    return {"throughput_ratio": {"value": round(ratio, 4), "target": f">= {THROUGHPUT_RATIO_TARGET:.4g} (1/6)",
                                 "met": ratio >= THROUGHPUT_RATIO_TARGET},
            "cpu_ratio": {"value": round(cpu_ratio, 2), "target": f"<= {CPU_RATIO_TARGET:g}",
                          "met": cpu_ratio <= CPU_RATIO_TARGET},
            "probe_p99_ms": {"value": p99, "target": f"<= {PROBE_P99_TARGET_MS:g}", "met": p99 <= PROBE_P99_TARGET_MS},
            "all_active": wave["all_active"]}


def rabbitmq_priority_facts() -> dict[str, Any]:
    """RabbitMQ: where the chains' steps go, and whether a probe shares their queue."""
    from berth.brokers.rabbitmq.admin import ManagementAPI
    from tasks import app

    api = ManagementAPI(app.conf.broker_url, app.conf.berth_rabbitmq_api)
    steps = app.conf.berth_steps_queue
    queues = {name: dict((api.queue(name) or {}).get("arguments") or {}) for name in dict.fromkeys((steps, TASK_QUEUE))}
    if steps == TASK_QUEUE:
        note = ("The chains' steps share the taskmanager queue, which has no priorities on RabbitMQ: a probe (or a "
                "new request) waits behind the whole backlog of chain steps.")
    else:
        note = (f"The chains' steps go to {steps}, the probe (and every request) to {TASK_QUEUE}; the taskmanager "
                "consumes both, with a prefetch per queue, so a probe waits for a free process, not behind the "
                "backlog.")
    return {"steps_queue": steps, "queue_arguments": queues, "note": note}


def measure(stack: Any, instances: int, probe_priority: int | None, events: bool) -> dict[str, Any]:
    from bench.common import group_cpu_s
    from bench.fleet import READY_LINE
    from tasks import app
    from tasks.runtime import redis_client
    from tests.helpers import wait_until

    taskmanager = stack.start_taskmanager(concurrency=2)
    prefix = f"wave{uuid.uuid4().hex[:4]}"
    fleet = stack.start([sys.executable, "-m", "bench.fleet", "--prefix", prefix, "--count", str(instances)], "fleet")
    wait_until(lambda: READY_LINE in fleet.log(), 60, message="fleet ready")
    times = TaskTimes(app)
    if events:
        times.start()
        times.ready.wait(10)
    for _ in range(20):  # warm up: both worker processes, the result consumer, the connections
        app.send_task("celery.accumulate", args=[1]).get(timeout=10)
    client = redis_client()
    out: dict[str, Any] = {"instances": instances, "probe_priority": probe_priority, "broker": stack.kind}
    out["probe_idle"] = run_probe(probe_priority, 2.0)
    times.reset()
    cpu0 = group_cpu_s(taskmanager.pid)
    out["bare"] = bare_throughput(app, client, instances)
    out["bare"]["taskmanager_cpu_ms_per_task"] = round(1000 * (group_cpu_s(taskmanager.pid) - cpu0) / instances, 3)
    out["bare_task_times"] = times.snapshot()
    times.reset()
    wave = Wave(client, [f"{prefix}-{n}" for n in range(instances)], amqp_depth() if stack.on_rabbitmq else None)
    client.config_resetstat()
    probe = ProbeProcess(probe_priority)
    cpu0 = group_cpu_s(taskmanager.pid)
    wave.submit()
    wall_s = wave.wait(WAVE_DEADLINE_S)
    wave_cpu_s = group_cpu_s(taskmanager.pid) - cpu0
    out["wave_redis_time"] = redis_time(client, wall_s)
    out["probe_wave"] = probe.finish()
    out["wave"] = wave.figures()
    # The probe's tasks run meanwhile too: a few hundred no-ops, against thousands of steps.
    out["wave"]["taskmanager_cpu_ms_per_provisioning"] = round(1000 * wave_cpu_s / instances, 3)
    time.sleep(0.5)  # the last task events
    out["wave_task_times"] = times.snapshot()
    times.finish()
    fleet.stop(timeout_s=10)
    out["fleet"] = fleet_counts(fleet.log())
    out["priority"] = rabbitmq_priority_facts() if stack.on_rabbitmq else priority_facts()
    out["targets"] = targets(out["bare"], out["wave"], out["probe_wave"])
    return out


def run(instances: int = 1000, probe_priority: int | None = 0, events: bool = True,
        broker: str = "redis") -> dict[str, Any]:
    """The whole benchmark on a private stack; the figures and whether the targets are met."""
    from bench.common import BenchStack, machine

    stack = BenchStack(broker)  # before `tasks` is imported: it points celeryconfig at the private broker
    try:
        out = measure(stack, instances, probe_priority, events)
        out["machine"] = machine()
        return out
    finally:
        stack.close()


def main() -> int:
    from bench.common import broker_option

    parser = argparse.ArgumentParser(prog="python -m bench.concurrency")
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--probe-priority", type=int, default=0, help="the probe's priority (0-9; kombu: 0 first)")
    parser.add_argument("--no-events", action="store_true", help="do not time the taskmanager's tasks by its events")
    parser.add_argument("--probe-only", action="store_true", help=argparse.SUPPRESS)
    broker_option(parser)
    args = parser.parse_args()
    if args.probe_only:
        return probe_only(args.probe_priority)
    print(json.dumps(run(args.instances, args.probe_priority, not args.no_events, args.broker), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
