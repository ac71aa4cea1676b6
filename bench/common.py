"""What every benchmark shares: a private stack (embedded broker, a taskmanager with 2 worker
processes), percentiles, and a description of the machine and versions for BENCHMARKS.md.

Figures are only comparable within one run on one machine: each benchmark measures its own
baseline on the same broker in the same run, and reports ratios.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary_ms(values: list[float]) -> dict[str, float]:
    """p50, p99 and max of seconds, in milliseconds."""
    return {"n": len(values), "p50_ms": statistics.median(values) * 1000,
            "p99_ms": percentile(values, 0.99) * 1000, "max_ms": max(values) * 1000}


@dataclass
class BenchStack:
    """A private broker and BERTH_HOME; the taskmanager is started with `start_taskmanager`.

    Must be made before `tasks` is imported: it sets CELERY_BROKER_URL, CELERY_RESULT_BACKEND
    and BERTH_HOME in os.environ (celeryconfig reads them at import).
    """

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="berth-bench-")))
    procs: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        from devtools.broker import EmbeddedRedis

        self.broker = EmbeddedRedis(self.root / "redis").start()
        os.environ.update(CELERY_BROKER_URL=self.broker.url, CELERY_RESULT_BACKEND=self.broker.url,
                          BERTH_HOME=str(self.root / "home"))

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
        self.broker.stop()
        shutil.rmtree(self.root, ignore_errors=True)


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
                    f"redis-server {next((w.split('=')[1] for w in server if w.startswith('v=')), '?')}",
    }
