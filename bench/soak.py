"""`make soak`: provision and delete over and over while things crash; count what went wrong.

    .venv/bin/python -m bench.soak --cycles 1000 [--concurrency 6] [--seed N]

A private stack (its own broker, taskmanager and guest disks under a temporary folder) runs
``--cycles`` provision -> ACTIVE -> delete -> DELETED cycles, a few at a time, with real
local guests. Meanwhile it crashes things, the way the drills in tests/test_drills.py do:

- per cycle, at random: the guest SIGKILLed mid-prepare and started again on the same disk,
  or frozen (SIGSTOP) for a second mid-prepare and thawed;
- every so often: the taskmanager SIGKILLed and restarted, or the broker SIGKILLed and
  restarted from its AOF.

At the end it prints how many were provisioned, lost (a provisioning that never reached
ACTIVE or a delete that never reached DELETED), applied twice (a guest journal counting a
prepare applied more than once), keys leaked (any broker key or ACL user naming a deleted instance other
than its audit record), and the taskmanager's memory growth. It exits 1 unless the first
three are zero.
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

T = TypeVar("T")
ROOT = Path(tempfile.mkdtemp(prefix="berth-soak-"))
os.environ["BERTH_HOME"] = str(ROOT / "home")
os.environ.setdefault("BERTH_NODE_LEASE_S", "3")
os.environ.setdefault("BERTH_STALL_AFTER_S", "20")

from devtools.broker import EmbeddedRedis  # noqa: E402

BROKER = EmbeddedRedis(ROOT / "redis")
os.environ["CELERY_BROKER_URL"] = os.environ["CELERY_RESULT_BACKEND"] = BROKER.url

import redis  # noqa: E402

from berth.paths import PROJECT_DIR  # noqa: E402
from berth.records import Records  # noqa: E402
from tasks.drivers import LocalDriver  # noqa: E402

GUEST_CRASHES = {"none": 0.6, "guest_kill": 0.25, "guest_freeze": 0.15}
CYCLE_TIMEOUT_S = 180.0
# Seconds between global crashes (uniformly drawn from these ranges).
TASKMANAGER_KILL_EVERY_S = (45.0, 150.0)
BROKER_KILL_EVERY_S = (90.0, 200.0)


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.driver = LocalDriver()
        self.client = redis.Redis.from_url(BROKER.url, decode_responses=True, socket_connect_timeout=2)
        self.records = Records(self.client)
        self.taskmanager: subprocess.Popen[bytes] | None = None
        self.tm_starts = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []
        self.rss: list[tuple[int, float]] = []  # (taskmanager start number, MiB)

    # --- processes ---------------------------------------------------------------------------

    def start_taskmanager(self) -> None:
        self.tm_starts += 1
        log = open(ROOT / f"taskmanager-{self.tm_starts}.log", "ab")  # noqa: SIM115 - the child keeps it
        self.taskmanager = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", "taskmanager", "-c", "2",
             "-n", "soak@%h", "-l", "INFO"], cwd=PROJECT_DIR, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(PROJECT_DIR)}, start_new_session=True)
        path = ROOT / f"taskmanager-{self.tm_starts}.log"
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

    def chaos(self) -> None:
        """Kill the taskmanager now and then, the broker more rarely."""
        next_tm = time.monotonic() + self.rng.uniform(*TASKMANAGER_KILL_EVERY_S)
        next_broker = time.monotonic() + self.rng.uniform(*BROKER_KILL_EVERY_S)
        while not self.stop.wait(0.5):
            now = time.monotonic()
            if now >= next_tm:
                with self.lock:
                    self.kill_taskmanager()
                    self.counts["crash: taskmanager SIGKILL"] += 1
                    self.start_taskmanager()
                next_tm = now + self.rng.uniform(*TASKMANAGER_KILL_EVERY_S)
            if now >= next_broker:
                with self.lock:
                    BROKER.kill()
                    self.counts["crash: broker SIGKILL"] += 1
                    BROKER.start()
                next_broker = now + self.rng.uniform(*BROKER_KILL_EVERY_S)

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
            self.failures.append(f"{instance_id}: provisioning ended {status}")
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
        """Broker keys naming a soak instance, other than its audit record."""
        names = re.compile(rf"soak-{self.args.seed}-\d+(?![0-9])")
        keys = [k for k in self.client.scan_iter(count=1000) if names.search(k) and not k.startswith("berth:instance:")]
        # A deleted instance's guest keeps no broker user either.
        users = [f"ACL user {u}" for u in self.client.execute_command("ACL", "USERS") if names.search(u)]
        return sorted(keys + users)

    def run(self) -> int:
        BROKER.start()
        try:
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
        return 0 if not (self.counts["lost"] or self.counts["applied twice"] or leaked) else 1

    def settled_leaks(self) -> list[str]:
        """Leaked keys, once stragglers (a stopped chain's last step) had a minute to settle."""
        deadline = time.monotonic() + 60
        leaked = self.leaked_keys()
        while leaked and time.monotonic() < deadline:
            time.sleep(1)
            leaked = self.leaked_keys()
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
              f"{elapsed:.0f} s")
        for name, value in sorted(self.counts.items()):
            if name.startswith("crash") or "missed" in name:
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
        BROKER.stop()


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
        except Exception as exc:  # noqa: BLE001 - kombu's OperationalError while the broker restarts
            if "OperationalError" not in type(exc).__name__ or time.monotonic() >= deadline:
                raise
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{what}: not done within {timeout_s:g} s")
        time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak")
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    args = parser.parse_args()
    print(f"soak: state in {ROOT}", flush=True)
    return Soak(args).run()


if __name__ == "__main__":
    sys.exit(main())
