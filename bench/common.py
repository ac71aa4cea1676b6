"""What every benchmark shares: a private stack (its own broker, a taskmanager with 2 worker
processes), percentiles, and a description of the machine and versions for BENCHMARKS.md.

The broker is ``redis`` (the embedded Redis: broker and store at once), ``rabbitmq`` (a private
RabbitMQ node, with an embedded Redis beside it as result backend and store of instance
records) or, for the soak only, ``cluster`` (three private RabbitMQ nodes, joined, quorum
queues, the same Redis beside them). Every node is a private one on free loopback ports: never
a service that happens to run on the machine.

Figures are only comparable within one run on one machine: each benchmark measures its own
baseline on the same broker in the same run, and reports ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

# The brokers `make bench` measures side by side; the soak also runs on a RabbitMQ cluster.
BENCH_BROKERS = ("redis", "rabbitmq")
SOAK_BROKERS = ("redis", "rabbitmq", "cluster")
BROKER_TITLES = {"redis": "Redis", "rabbitmq": "RabbitMQ", "cluster": "RabbitMQ cluster"}


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary_ms(values: list[float]) -> dict[str, float]:
    """p50, p99 and max of seconds, in milliseconds."""
    return {"n": len(values), "p50_ms": statistics.median(values) * 1000,
            "p99_ms": percentile(values, 0.99) * 1000, "max_ms": max(values) * 1000}


def broker_option(parser: argparse.ArgumentParser, choices: tuple[str, ...] = BENCH_BROKERS) -> None:
    """``--broker {redis,rabbitmq}`` on a benchmark's command line."""
    parser.add_argument("--broker", choices=choices, default="redis",
                        help="the private broker to run on (default: redis)")


class Brokers:
    """A private broker and the store beside it, under ``root`` (nothing is started yet).

    ``redis``: one embedded Redis, broker and store at once. ``rabbitmq``: a RabbitMQ node plus an
    embedded Redis as result backend (records, answers). ``cluster``: three joined RabbitMQ nodes
    (quorum queues) plus that Redis. Every URL is known before `start`, so the environment can be
    set before anything reads it.
    """

    def __init__(self, root: Path, kind: str = "redis") -> None:
        from devtools.broker import EmbeddedRedis

        if kind not in SOAK_BROKERS:
            raise ValueError(f"broker {kind!r}: expected one of {', '.join(SOAK_BROKERS)}")
        self.kind = kind
        self.store = EmbeddedRedis(root / "redis")
        self.nodes: list[Any] = []
        self.cluster: Any = None
        if kind == "rabbitmq":
            from devtools.rabbitmq import RabbitNode

            self.nodes = [RabbitNode(root / "rabbitmq")]
        elif kind == "cluster":
            from devtools.rabbitmq import RabbitCluster

            self.cluster = RabbitCluster(root / "cluster", size=3)
            self.nodes = list(self.cluster.nodes)

    @property
    def on_rabbitmq(self) -> bool:
        return self.kind != "redis"

    @property
    def queue_type(self) -> str:
        return "quorum" if self.kind == "cluster" else "classic"

    @property
    def url(self) -> str:
        """The broker URL (the admin's; a cluster's is every node's, joined by ";")."""
        if self.cluster is not None:
            return str(self.cluster.url)
        return str(self.nodes[0].url) if self.nodes else str(self.store.url)

    @property
    def store_url(self) -> str:
        return str(self.store.url)

    @property
    def api(self) -> str:
        """The management API of every node, comma-joined ("" on Redis)."""
        return ",".join(str(node.api) for node in self.nodes)

    def env(self) -> dict[str, str]:
        """What celeryconfig reads to run on this broker."""
        env = {"CELERY_BROKER_URL": self.url, "CELERY_RESULT_BACKEND": self.store_url}
        if self.on_rabbitmq:
            env.update(BERTH_RABBITMQ_API=self.api, BERTH_QUEUE_TYPE=self.queue_type)
        return env

    def start(self) -> Brokers:
        self.store.start()
        if self.cluster is not None:
            self.cluster.start()
        for node in self.nodes:
            if node.pid() is None:
                node.start()
        return self

    def admin(self) -> Any:
        """The RabbitMQ management API as the admin (RabbitMQ only)."""
        from berth.brokers.rabbitmq.admin import ManagementAPI

        return ManagementAPI(self.url, self.api)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        self.store.stop()


class BenchStack:
    """A private broker and BERTH_HOME; the taskmanager is started with `start_taskmanager`.

    Must be made before `tasks` is imported: it sets CELERY_BROKER_URL, CELERY_RESULT_BACKEND,
    BERTH_HOME (and on RabbitMQ BERTH_RABBITMQ_API, BERTH_QUEUE_TYPE) in os.environ: celeryconfig
    reads them at import.
    """

    def __init__(self, broker: str = "redis", root: Path | None = None) -> None:
        self.root = root or Path(tempfile.mkdtemp(prefix="berth-bench-"))
        self.procs: list[Any] = []
        self.brokers = Brokers(self.root, broker)
        try:
            self.brokers.start()
        except BaseException:
            self.brokers.stop()
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        os.environ.update(self.brokers.env(), BERTH_HOME=str(self.root / "home"))

    @property
    def kind(self) -> str:
        return self.brokers.kind

    @property
    def on_rabbitmq(self) -> bool:
        return self.brokers.on_rabbitmq

    def start(self, args: list[str], name: str, env: dict[str, str] | None = None) -> Any:
        from tests.helpers import Proc

        proc = Proc(args, self.root / f"{name}.log", env=env or dict(os.environ))
        self.procs.append(proc)
        return proc

    def start_taskmanager(self, concurrency: int = 2, queues: str = "taskmanager") -> Any:
        """`celery -A tasks worker -Q taskmanager -c 2`, once it answers a ping."""
        from tasks import app
        from tests.helpers import celery, wait_until

        proc = self.start(celery("-A", "tasks", "worker", "-Q", queues, "-c", str(concurrency),
                                 "-n", f"bench-{len(self.procs)}@%h", "-l", "WARNING"), "taskmanager")
        wait_until(lambda: app.control.inspect(timeout=1).ping(), 60, message="taskmanager up")
        return proc

    def close(self) -> None:
        from tasks.drivers import LocalDriver

        for proc in reversed(self.procs):
            proc.stop(timeout_s=10)
        LocalDriver().stop_all(timeout_s=3)
        self.brokers.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) of the live processes of a process group: a worker and its pool."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """Resident memory of a process (VmRSS), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def machine() -> dict[str, str]:
    """What BENCHMARKS.md says about where and with what a run was made."""
    import celery
    import kombu
    import redis

    from berth.redis_server import redis_server_binary

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import subprocess

    server = subprocess.run([redis_server_binary(), "--version"], capture_output=True, text=True).stdout.split()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} cores, {cpu}, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": f"celery {celery.__version__}, kombu {kombu.__version__}, redis-py {redis.__version__}, "
                    f"redis-server {next((w.split('=')[1] for w in server if w.startswith('v=')), '?')}, "
                    f"rabbitmq-server {rabbitmq_version()}",
    }


def rabbitmq_version() -> str:
    """The installed RabbitMQ's version, from its install folder (rabbitmq_server-X.Y.Z), or "?"."""
    from devtools.rabbitmq import SERVER

    try:
        folder = SERVER.resolve().parent.parent.name
    except OSError:
        return "?"
    return folder.removeprefix("rabbitmq_server-") if folder.startswith("rabbitmq_server-") else "?"
