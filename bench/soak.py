"""`make soak`: provision and delete over and over while things crash; count what went wrong.

    .venv/bin/python -m bench.soak --cycles 1000 [--concurrency 6] [--seed N]
                                   [--broker redis|rabbitmq|cluster] [--chaos-every SECONDS]

A private stack (its own broker, taskmanager and guest disks under a temporary folder) runs
``--cycles`` provision -> ACTIVE -> delete -> DELETED cycles, a few at a time, with real
local guests. Meanwhile it crashes things, the way the drills in tests/test_drills.py do:

- per cycle, at random: the guest SIGKILLed mid-prepare and started again on the same disk,
  or frozen (SIGSTOP) for a second mid-prepare and thawed;
- every so often: the taskmanager SIGKILLed and restarted, or the broker crashed:
  - ``--broker redis`` (the default): the embedded Redis, broker and store at once, SIGKILLed
    and restarted from its AOF;
  - ``--broker rabbitmq``: a private RabbitMQ node SIGKILLed and restarted from its data (the
    records and answers live in an embedded Redis beside it, which is not crashed);
  - ``--broker cluster``: three joined RabbitMQ nodes with quorum queues; one of them (a
    minority), chosen at random, is SIGKILLed and started again some seconds later from its
    data, and must be seen running in the cluster again (it rejoins).

``--chaos-every S`` crashes the taskmanager and the broker each every S/2 to 3S/2 seconds
instead (a short run that still sees crashes).

At the end it prints how many were provisioned, lost (a provisioning that never reached
ACTIVE or a delete that never reached DELETED), applied twice (a guest journal counting a
prepare applied more than once), keys leaked (any key or ACL user of the Redis store naming a
deleted instance other than its audit record, and on RabbitMQ any queue, exchange or user named
``guest.<instance>``), and the taskmanager's memory growth. It exits 1 unless the first three
are zero (and, on a cluster, every killed node rejoined).

The broker is chosen from the command line before any project module that reads the settings
(celeryconfig, through `tasks` and `workflows`) is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import redis

from bench.common import BROKER_TITLES, SOAK_BROKERS, Brokers

T = TypeVar("T")
GUEST_CRASHES = {"none": 0.6, "guest_kill": 0.25, "guest_freeze": 0.15}
CYCLE_TIMEOUT_S = 180.0
# Seconds between global crashes (uniformly drawn from these ranges).
TASKMANAGER_KILL_EVERY_S = (45.0, 150.0)
BROKER_KILL_EVERY_S = (90.0, 200.0)
# A cluster node stays down this long (at most half the time to the next crash) before it is started again.
NODE_DOWN_S = (5.0, 20.0)
NODE_REJOIN_TIMEOUT_S = 90.0


class Soak:
    def __init__(self, args: argparse.Namespace, root: Path, brokers: Brokers) -> None:
        # The environment points at the private broker by now: the project's modules may load.
        from berth.records import Records
        from tasks.drivers import LocalDriver

        self.args, self.root, self.brokers = args, root, brokers
        self.rng = random.Random(args.seed)
        self.driver = LocalDriver()
        self.client = redis.Redis.from_url(brokers.store_url, decode_responses=True, socket_connect_timeout=2)
        self.records = Records(self.client)
        self.taskmanager: subprocess.Popen[bytes] | None = None
        self.tm_starts = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []
        self.rss: list[tuple[int, float]] = []  # (taskmanager start number, MiB)
        self.down: Any = None  # the cluster node killed and not started again yet
        self.down_until = 0.0

    # --- processes ---------------------------------------------------------------------------

    def start_taskmanager(self) -> None:
        from berth.paths import PROJECT_DIR

        self.tm_starts += 1
        log = open(self.root / f"taskmanager-{self.tm_starts}.log", "ab")  # noqa: SIM115 - the child keeps it
        self.taskmanager = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", "taskmanager", "-c", "2",
             "-n", "soak@%h", "-l", "INFO"], cwd=PROJECT_DIR, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(PROJECT_DIR)}, start_new_session=True)
        path = self.root / f"taskmanager-{self.tm_starts}.log"
        retry(lambda: " ready." in path.read_text(errors="replace"), 60, "taskmanager ready")

    def kill_taskmanager(self) -> None:
        assert self.taskmanager is not None
        os.killpg(self.taskmanager.pid, signal.SIGKILL)
        self.taskmanager.wait()

    def taskmanager_rss_mib(self) -> float:
        """Resident memory of the taskmanager and its pool processes."""
        assert self.taskmanager is not None
        pids = [self.taskmanager.pid]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if stat[1] == str(self.taskmanager.pid):
                    pids.append(int(entry.name))
        total_kib = 0
        for pid in pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total_kib += int(line.split()[1])
            except OSError:
                pass
        return total_kib / 1024

    # --- chaos -----------------------------------------------------------------------------------

    def intervals(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """(taskmanager, broker) ranges of seconds between crashes."""
        every = self.args.chaos_every
        if every:
            return (every / 2, every * 1.5), (every / 2, every * 1.5)
        return TASKMANAGER_KILL_EVERY_S, BROKER_KILL_EVERY_S

    def chaos(self) -> None:
        """Kill the taskmanager now and then, the broker (or a cluster node) more rarely."""
        try:
            self.crash_now_and_then()
        except Exception as exc:  # noqa: BLE001 - reported, and the soak fails
            self.counts["chaos failed"] += 1
            self.failures.append(f"chaos: {type(exc).__name__}: {exc}")

    def crash_now_and_then(self) -> None:
        tm_every, broker_every = self.intervals()
        next_tm = time.monotonic() + self.rng.uniform(*tm_every)
        next_broker = time.monotonic() + self.rng.uniform(*broker_every)
        try:
            while not self.stop.wait(0.5):
                now = time.monotonic()
                if now >= next_tm:
                    with self.lock:
                        self.kill_taskmanager()
                        self.counts["crash: taskmanager SIGKILL"] += 1
                        self.start_taskmanager()
                    next_tm = now + self.rng.uniform(*tm_every)
                if self.down is not None and now >= self.down_until:
                    self.restart_node()
                if now >= next_broker and self.down is None:
                    gap = self.rng.uniform(*broker_every)
                    self.crash_broker(gap)
                    next_broker = time.monotonic() + gap
        finally:
            if self.down is not None:
                self.restart_node()

    def crash_broker(self, gap_s: float) -> None:
        """SIGKILL the broker and start it again; on a cluster, one node, started again later."""
        kind = self.brokers.kind
        if kind == "redis":
            with self.lock:
                self.brokers.store.kill()
                self.counts["crash: broker SIGKILL (Redis)"] += 1
                self.brokers.store.start()
        elif kind == "rabbitmq":
            node = self.brokers.nodes[0]
            with self.lock:
                node.kill()
                self.counts["crash: broker SIGKILL (RabbitMQ node)"] += 1
                node.start()
        else:
            node = self.rng.choice(self.brokers.nodes)
            node.kill()
            self.counts["crash: cluster node SIGKILL (1 of 3)"] += 1
            self.down = node
            down_s = min(self.rng.uniform(*NODE_DOWN_S), gap_s / 2)
            self.down_until = time.monotonic() + down_s
            print(f"  chaos: cluster node {node.name} SIGKILLed, started again in {down_s:.0f} s", flush=True)

    def restart_node(self) -> None:
        """Start the killed cluster node again from its data and wait until the cluster runs it."""
        node, self.down = self.down, None
        if node is None:
            return
        started = time.monotonic()
        node.start()
        deadline = started + NODE_REJOIN_TIMEOUT_S
        while time.monotonic() < deadline:
            running = self.brokers.cluster.running_nodes()
            if node.name in running:
                self.counts["cluster node rejoined"] += 1
                took = time.monotonic() - started
                print(f"  chaos: cluster node {node.name} running in the cluster again, {took:.0f} s after its start"
                      f" (running: {', '.join(sorted(running))})", flush=True)
                return
            time.sleep(0.5)
        self.counts["cluster node did not rejoin"] += 1
        self.failures.append(f"cluster node {node.name} not running in the cluster {NODE_REJOIN_TIMEOUT_S:g} s "
                             f"after its restart (running: {self.brokers.cluster.running_nodes()})")

    # --- one cycle -------------------------------------------------------------------------------

    def journal(self, instance_id: str) -> dict[str, Any]:
        path = self.driver.guest_dir(instance_id) / "prepare.json"
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            return {}

    def status(self, instance_id: str) -> str | None:
        def read() -> tuple[str | None]:
            record = self.records.get(instance_id)
            return (None if record is None else record.status.value,)

        return retry(read, 30, "read record")[0]

    def wait_status(self, instance_id: str, wanted: set[str]) -> str | None:
        deadline = time.monotonic() + CYCLE_TIMEOUT_S
        status = None
        while time.monotonic() < deadline:
            status = self.status(instance_id)
            if status in wanted:
                return status
            time.sleep(0.1)
        return status

    def keep_guest_log(self, instance_id: str) -> str:
        """Copy the guest's log out of its folder (delete removes it): where it now is, or ""."""
        log = self.driver.guest_dir(instance_id) / "agent.log"
        kept = self.root / "failed" / f"{instance_id}.agent.log"
        try:
            kept.parent.mkdir(exist_ok=True)
            kept.write_bytes(log.read_bytes())
        except OSError:
            return ""
        return f" (guest log: {kept})"

    def crash_guest(self, instance_id: str, kind: str) -> None:
        """Wait for prepare to be under way on the guest, then kill or freeze it."""
        deadline = time.monotonic() + 60
        while not self.journal(instance_id).get("deliveries") and time.monotonic() < deadline:
            time.sleep(0.02)
        pid = self.driver.pid(instance_id)
        if pid is None or self.journal(instance_id).get("applied"):
            self.counts[f"{kind} missed (prepare already done)"] += 1
            return
        if kind == "guest_kill":
            os.killpg(pid, signal.SIGKILL)
            retry(lambda: self.driver.pid(instance_id) is None, 10, "guest gone")
            self.driver.restart(instance_id)
        else:
            os.killpg(pid, signal.SIGSTOP)
            time.sleep(1.0)
            os.killpg(pid, signal.SIGCONT)
        self.counts[f"crash: {kind}"] += 1

    def cycle(self, n: int) -> None:
        from workflows import submit, submit_delete

        instance_id = f"soak-{self.args.seed}-{n}"
        kind = self.rng.choices(list(GUEST_CRASHES), weights=list(GUEST_CRASHES.values()))[0]
        prepare_s = round(self.rng.uniform(0.3, 1.0), 2) if kind != "none" else 0.0
        retry(lambda: submit(instance_id, datastore="noop", ping_deadline_s=120, prepare_deadline_s=120,
                             config={"prepare_seconds": prepare_s}), 60, "submit")
        if kind != "none":
            self.crash_guest(instance_id, kind)
        status = self.wait_status(instance_id, {"ACTIVE", "FAILED"})
        applied = [int(v) for v in self.journal(instance_id).get("applied", {}).values()]
        self.counts["provisioned"] += 1
        if status != "ACTIVE":
            self.counts["lost"] += 1
            self.failures.append(f"{instance_id}: provisioning ended {status}{self.keep_guest_log(instance_id)}")
        if any(a > 1 for a in applied):
            self.counts["applied twice"] += 1
            self.failures.append(f"{instance_id}: applied {applied}")
        retry(lambda: submit_delete(instance_id), 60, "submit delete")
        if self.wait_status(instance_id, {"DELETED"}) != "DELETED":
            self.counts["lost"] += 1
            self.failures.append(f"{instance_id}: delete never finished ({self.status(instance_id)})")
        else:
            self.counts["deleted"] += 1
        if n % 10 == 0:
            with self.lock:
                self.rss.append((self.tm_starts, self.taskmanager_rss_mib()))
        if n % 100 == 0:
            print(f"  cycle {n}: {dict(self.counts)}", flush=True)

    # --- the end ---------------------------------------------------------------------------------

    def leaked_keys(self) -> list[str]:
        """Keys of the Redis store (the broker itself on Redis) naming a soak instance, other than
        its audit record; and on RabbitMQ, queues, exchanges and users named after one."""
        names = re.compile(rf"soak-{self.args.seed}-\d+(?![0-9])")
        keys = [k for k in self.client.scan_iter(count=1000) if names.search(k) and not k.startswith("berth:instance:")]
        # A deleted instance's guest keeps no Redis user either.
        users = [f"ACL user {u}" for u in self.client.execute_command("ACL", "USERS") if names.search(u)]
        return sorted(keys + users + self.rabbitmq_leaks(names))

    def rabbitmq_leaks(self, names: re.Pattern[str]) -> list[str]:
        """RabbitMQ queues, exchanges and users named ``guest.<soak instance>`` (none on Redis)."""
        if not self.brokers.on_rabbitmq:
            return []
        admin = self.brokers.admin()
        prefix = f"guest.soak-{self.args.seed}-"
        return ([f"RabbitMQ queue {q}" for q in admin.queue_names(prefix) if names.search(q)]
                + [f"RabbitMQ exchange {e}" for e in admin.exchange_names(prefix) if names.search(e)]
                + [f"RabbitMQ user {u}" for u in sorted(admin.user_names()) if names.search(u)])

    def run(self) -> int:
        leaked: list[str] = []
        try:
            self.brokers.start()
            self.start_taskmanager()
            started = time.monotonic()
            chaos = threading.Thread(target=self.chaos, daemon=True)
            chaos.start()
            with ThreadPoolExecutor(self.args.concurrency) as pool:
                for future in [pool.submit(self.cycle, n) for n in range(self.args.cycles)]:
                    future.result()
            self.stop.set()
            chaos.join()
            leaked = self.settled_leaks()
            self.report(leaked, time.monotonic() - started)
        finally:
            # Ctrl-C or a failure too: nothing of the soak keeps running.
            self.stop.set()
            self.shutdown()
        bad = (self.counts["lost"] or self.counts["applied twice"] or self.counts["cluster node did not rejoin"]
               or self.counts["chaos failed"])
        return 0 if not (bad or leaked) else 1

    def leaked_now(self) -> list[str]:
        return retry(lambda: (self.leaked_keys(),), 60, "read what is left")[0]

    def settled_leaks(self) -> list[str]:
        """Leaked keys, once stragglers (a stopped chain's last step) had a minute to settle."""
        deadline = time.monotonic() + 60
        leaked = self.leaked_now()
        while leaked and time.monotonic() < deadline:
            time.sleep(1)
            leaked = self.leaked_now()
        return leaked

    def memory_growth(self) -> str:
        """RSS growth of the taskmanager over its longest life between two crashes."""
        lives: dict[int, list[float]] = {}
        for start, mib in self.rss:
            lives.setdefault(start, []).append(mib)
        longest = max(lives.values(), key=len, default=[])
        if len(longest) < 2:
            return "n/a (no life long enough to measure)"
        return (f"{longest[-1] - longest[0]:+.1f} MiB ({longest[0]:.1f} -> {longest[-1]:.1f} MiB over its longest "
                f"life between crashes, about {10 * (len(longest) - 1)} cycles)")

    def report(self, leaked: list[str], elapsed: float) -> None:
        growth = self.memory_growth()
        print(f"\nsoak: {self.args.cycles} cycles, concurrency {self.args.concurrency}, seed {self.args.seed}, "
              f"broker {BROKER_TITLES[self.brokers.kind]}, {elapsed:.0f} s")
        for name, value in sorted(self.counts.items()):
            if name.startswith(("crash", "cluster", "chaos")) or "missed" in name:
                print(f"  {name:<44} {value}")
        print(f"  {'provisioned':<44} {self.counts['provisioned']}")
        print(f"  {'deleted':<44} {self.counts['deleted']}")
        print(f"  {'lost':<44} {self.counts['lost']}")
        print(f"  {'applied twice':<44} {self.counts['applied twice']}")
        print(f"  {'keys leaked':<44} {len(leaked)}")
        print(f"  {'taskmanager memory growth':<44} {growth}")
        for line in self.failures[:20] + leaked[:20]:
            print(f"    {line}")

    def shutdown(self) -> None:
        if self.taskmanager is not None:
            self.taskmanager.send_signal(signal.SIGTERM)
            try:
                self.taskmanager.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill_taskmanager()
        self.driver.stop_all(timeout_s=3)
        self.brokers.stop()


def retry(action: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run action until it returns something truthy, riding out a broker restart."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = action()
            if result:
                return result
        except (redis.RedisError, OSError) as exc:
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{what}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - kombu's or py-amqp's errors while the broker restarts
            if not transient(exc) or time.monotonic() >= deadline:
                raise
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{what}: not done within {timeout_s:g} s")
        time.sleep(0.1)


def transient(exc: BaseException) -> bool:
    """An error of a broker going away or coming back (kombu's OperationalError, py-amqp's
    recoverable errors, a nacked or unconfirmed publish), not of the request itself."""
    from amqp.exceptions import MessageNacked, RecoverableChannelError, RecoverableConnectionError

    return ("OperationalError" in type(exc).__name__
            or isinstance(exc, (MessageNacked, RecoverableChannelError, RecoverableConnectionError)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak")
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    parser.add_argument("--broker", choices=SOAK_BROKERS, default="redis",
                        help="redis (default), rabbitmq (one node) or cluster (three nodes, quorum queues)")
    parser.add_argument("--chaos-every", type=float, default=None, metavar="SECONDS",
                        help="crash the taskmanager and the broker each every SECONDS/2 to 3*SECONDS/2 "
                             "(default: the taskmanager every 45-150 s, the broker every 90-200 s)")
    args = parser.parse_args(argv)
    if args.chaos_every is not None and args.chaos_every <= 0:
        parser.error("--chaos-every must be positive")
    root = Path(tempfile.mkdtemp(prefix="berth-soak-"))
    # Before anything of the project's reads the settings (celeryconfig, at the import of tasks).
    os.environ["BERTH_HOME"] = str(root / "home")
    os.environ.setdefault("BERTH_NODE_LEASE_S", "3")
    os.environ.setdefault("BERTH_STALL_AFTER_S", "20")
    brokers = Brokers(root, args.broker)
    os.environ.update(brokers.env())
    print(f"soak: broker {BROKER_TITLES[args.broker]}, state in {root}", flush=True)
    return Soak(args, root, brokers).run()


if __name__ == "__main__":
    sys.exit(main())
