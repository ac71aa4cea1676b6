"""`make run`'s launcher, as a user would run it on a fresh machine: its own embedded broker."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from berth.redis_server import free_port
from tests.helpers import Proc, project_env, wait_until


def processes_with_env(marker: str) -> list[int]:
    """Pids of live processes whose environment holds marker (everything the launcher started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_make_run_provisions_a_demo_instance_then_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    home = tmp_path / "berth-home"
    env = project_env(BERTH_HOME=str(home), FLOWER_PORT=str(free_port()))
    for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        env.pop(name, None)
    launcher = Proc([sys.executable, "-m", "devtools.run"], tmp_path / "run.out", env=env)
    try:
        wait_until(lambda: "press Ctrl-C" in launcher.log() or not launcher.alive(), 150, interval_s=0.2,
                   message="make run ready")
        out = launcher.log()
        assert "demo-1: ACTIVE" in out, out
        for line in ("broker:      redis://:**@127.0.0.1:", "taskmanager: ready", "demo-1: queue guest.demo-1 created",
                     "demo-1: guest answered", "connected as app: app:greeting = 'hello from berth'",
                     "flower:      http://127.0.0.1:"):
            assert line in out, out
        # The printed redis-cli line really connects with the printed password.
        printed = r"connect yourself:  (\S+) -h 127.0.0.1 -p (\d+) --user app --pass '([^']+)' GET app:greeting"
        cli, port, password = re.search(printed, out).groups()  # type: ignore[union-attr]
        assert redis.Redis(port=int(port), username="app", password=password).get("app:greeting") == b"hello from berth"
        shown = subprocess.run([cli, "-h", "127.0.0.1", "-p", port, "--user", "app", "--pass", password,
                                "--no-auth-warning", "GET", "app:greeting"], capture_output=True, text=True, timeout=10)
        assert shown.stdout.strip() == "hello from berth", "the printed command works as printed"
        assert (home / "redis" / "appendonly.aof").exists(), "the embedded broker keeps its AOF in BERTH_HOME"
        # Nobody gets in without the admin password, which only the control plane's files hold.
        broker_port = int(re.search(r"broker:      redis://:\*\*@127.0.0.1:(\d+)/", out).group(1))  # type: ignore[union-attr]
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=broker_port).get("berth:instances")
        for secret in ("redis", "redis/admin.secret", "master.key", "broker.url"):
            assert (home / secret).stat().st_mode & 0o077 == 0, f"{secret} is readable by others"
        assert processes_with_env(str(home)), "its processes carry BERTH_HOME"
    finally:
        launcher.popen.send_signal(signal.SIGINT)  # Ctrl-C reaches the launcher only
        launcher.popen.wait(timeout=60)
    assert launcher.popen.returncode == 0, launcher.log()
    assert "stopped." in launcher.log()
    wait_until(lambda: not processes_with_env(str(home)), 20, message="every started process gone")


@pytest.mark.rabbitmq
def test_make_run_on_rabbitmq_starts_a_private_node_and_stops_it_on_ctrl_c(tmp_path: Path) -> None:
    home = tmp_path / "berth-home"
    env = project_env(BERTH_HOME=str(home), FLOWER_PORT=str(free_port()), BERTH_BROKER="rabbitmq")
    for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "BERTH_RABBITMQ_API", "BERTH_QUEUE_TYPE"):
        env.pop(name, None)
    launcher = Proc([sys.executable, "-m", "devtools.run"], tmp_path / "run.out", env=env)
    try:
        wait_until(lambda: "press Ctrl-C" in launcher.log() or not launcher.alive(), 180, interval_s=0.2,
                   message="make run ready")
        out = launcher.log()
        for line in ("broker:      amqp://berth-admin:**@127.0.0.1:", "demo-1: queue guest.demo-1 created",
                     "demo-1: ACTIVE", "connected as app: app:greeting = 'hello from berth'"):
            assert line in out, out
        assert (home / "rabbitmq" / "mnesia").is_dir(), "the node keeps its data under BERTH_HOME"
        assert (home / "rabbitmq" / "admin.secret").stat().st_mode & 0o077 == 0
        # A second shell needs no setting: the broker, the store and the API are found from BERTH_HOME.
        second = project_env(BERTH_HOME=str(home))
        for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "BERTH_RABBITMQ_API"):
            second.pop(name, None)
        shown = subprocess.run([sys.executable, "-m", "workflows", "show", "demo-1"], capture_output=True, text=True,
                               env=second, timeout=60)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert '"guest_consumers": 1' in shown.stdout and '"status": "ACTIVE"' in shown.stdout
    finally:
        launcher.popen.send_signal(signal.SIGINT)
        launcher.popen.wait(timeout=90)
    assert launcher.popen.returncode == 0, launcher.log()
    wait_until(lambda: not processes_with_env(str(home)), 30, message="every started process gone, the node too")
