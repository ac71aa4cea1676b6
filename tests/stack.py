"""A private Berth stack (broker, taskmanager, BERTH_HOME) for tests that stop or kill its parts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import redis

from tasks.drivers import LocalDriver
from tests.brokers import TestBroker
from tests.helpers import Proc, celery, project_env, wait_until, workflows_cli


class Stack:
    def __init__(self, root: Path, home: Path | None = None, *, broker: str | None = None,
                 queue_type: str = "classic", tls: bool = False, bind: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.root = root
        self.home = home or root / "home"
        # The session's broker kind (BERTH_TEST_BROKER) unless the test names one.
        self.broker = TestBroker(root, broker, queue_type=queue_type, tls=tls, bind=bind).start()
        self.env = project_env(**self.broker.env(), BERTH_HOME=str(self.home),
                               # Drills: a lapsed node is noticed within a second or two.
                               BERTH_NODE_LEASE_S="3", **(env or {}))
        self.taskmanagers: list[Proc] = []

    def start_taskmanager(self, name: str = "tm", **extra_env: str) -> Proc:
        proc = Proc(celery("-A", "tasks", "worker", "-Q", "taskmanager,guestapi", "-c", "2", "-n", f"{name}@%h",
                           "-l", "INFO"), self.root / "logs" / f"{name}-{len(self.taskmanagers)}.log",
                    env={**self.env, **extra_env})
        self.taskmanagers.append(proc)
        wait_until(lambda: " ready." in proc.log() or not proc.alive(), 60, message="taskmanager ready")
        assert proc.alive(), proc.log()
        return proc

    def cli(self, *args: str, timeout_s: float = 90, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return workflows_cli(*args, env=self.env, timeout_s=timeout_s, stdin=stdin)

    def provision(self, instance_id: str, *args: str) -> subprocess.CompletedProcess[str]:
        """`python -m workflows provision ID ARGS --wait` on this stack; it must end ACTIVE."""
        out = self.cli("provision", instance_id, *args, "--wait", timeout_s=120)
        assert out.returncode == 0, out.stdout + out.stderr
        return out

    def guest_env(self, instance_id: str) -> dict[str, str]:
        """The stack's environment with the guest's own user and key (`python -m workflows guest-env`)."""
        out = self.cli("guest-env", instance_id, "--json")
        assert out.returncode == 0, out.stdout + out.stderr
        return {**self.env, **json.loads(out.stdout)}

    def client(self) -> redis.Redis:
        """A decoded client on the store (instance records): the broker itself on Redis."""
        return self.broker.client()

    def guests(self) -> LocalDriver:
        return LocalDriver(self.home)

    def close(self) -> None:
        for proc in self.taskmanagers:
            proc.stop(timeout_s=10)
        self.guests().stop_all(timeout_s=3)
        self.broker.stop()
