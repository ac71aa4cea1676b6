"""Processes coming and going: the taskmanager's local guests, a broker that is down, guest status."""

from __future__ import annotations

import datetime as dt
import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from berth.paths import PROJECT_DIR
from berth.records import Records
from berth.redis_server import free_port
from tasks.drivers import group_alive
from tasks.runtime import broker
from tests.brokers import on_rabbitmq
from tests.helpers import project_env, send_to_guest, wait_until
from tests.stack import Stack
from workflows import provision_chain

pytestmark = pytest.mark.broker


def test_local_guests_stop_with_the_taskmanager_that_booted_them(stack: Stack) -> None:
    taskmanager = stack.start_taskmanager()
    out = stack.cli("provision", "life-1", "--datastore", "redis", "--wait")
    assert out.returncode == 0, out.stdout + out.stderr
    pid = stack.guests().pid("life-1")
    assert pid is not None and group_alive(pid)
    taskmanager.stop()
    assert "stopped 1 local guest(s) on shutdown: life-1" in taskmanager.log()
    wait_until(lambda: not group_alive(pid), 15, message="guest and its datastore gone")


@pytest.mark.redis  # RabbitMQ's: tests/test_rabbitmq.py
def test_a_broker_that_is_down_gives_a_clear_error_and_creates_nothing(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    env = project_env(CELERY_BROKER_URL=url, CELERY_RESULT_BACKEND=url, BERTH_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "workflows", "provision", "db-1", "--wait"], capture_output=True,
                         text=True, cwd=PROJECT_DIR, env=env, timeout=60)
    assert out.returncode == 3
    assert f"broker unreachable at {url}" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.usefixtures("taskmanager")
def test_get_status_reports_whether_the_datastore_answers(new_id: Callable[[str], str], records: Records) -> None:
    from tasks.drivers import LocalDriver

    instance_id = new_id("stat")
    provision_chain(instance_id, datastore="redis").apply_async().get(timeout=60)
    calls = itertools.count()

    def status() -> Any:
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30)
        return send_to_guest(instance_id, "guest.get_status", f"status.{next(calls)}",
                             expires=expires).get(timeout=20)

    reply = status()
    assert reply["prepared"] is True
    assert reply["datastore"]["status"] == "running"
    assert reply["datastore"]["port"] == records.get(instance_id)["connection"]["port"]  # type: ignore[index]
    # Stop only the datastore (the agent stays): the guest reports it down.
    datastore_pid = int((LocalDriver().guest_dir(instance_id) / "redis" / "redis.pid").read_text())
    os.kill(datastore_pid, signal.SIGKILL)
    wait_until(lambda: status()["datastore"]["status"] == "down", 20, interval_s=0.2,
               message="datastore reported down")


def test_a_second_agent_for_the_same_instance_refuses_to_start(new_id: Callable[[str], str],
                                                               start_guest: Callable[[str], Any]) -> None:
    instance_id = new_id("solo")
    broker().declare_guest_queue(instance_id)  # a guest consumes only a queue that exists
    first = start_guest(instance_id)
    wait_until(lambda: " ready." in first.log(), 30, message="first agent ready")
    second = start_guest(instance_id)
    assert second.popen.wait(timeout=30) != 0
    assert f"guest agent for {instance_id} refused to start" in second.log()
    assert f"another agent (pid {first.pid}) already serves it on this host" in second.log()
    assert first.alive()


def test_a_guest_refuses_to_start_with_unsafe_settings(new_id: Callable[[str], str], session_root: Path) -> None:
    from tests.helpers import Proc, guest_command

    instance_id = new_id("unsafe")
    # Redis: a visibility timeout shorter than a prepare; RabbitMQ: publisher confirms without a timeout.
    setting, complaint = (("BERTH_CONFIRM_TIMEOUT_S", "confirm_timeout (0.0)") if on_rabbitmq()
                          else ("BERTH_VISIBILITY_TIMEOUT_S", "visibility_timeout (30 s"))
    env = project_env(**{setting: "0" if on_rabbitmq() else "30"})
    guest = Proc(guest_command(instance_id), session_root / "logs" / f"unsafe-{instance_id}.log", env=env)
    assert guest.popen.wait(timeout=30) != 0
    assert "refused to start: unsafe settings" in guest.log() and complaint in guest.log()


def test_the_local_driver_never_takes_a_machine_from_another_provisioning(tmp_path: Path) -> None:
    from berth.errors import BootError
    from tasks.drivers import LocalDriver

    driver = LocalDriver(tmp_path)
    first = driver.boot("mine-1", 30.0, booted_by="test", request_id="request-a")  # sleeps 30 s: a slow VM
    try:
        assert driver.boot("mine-1", 0.0, booted_by="test", request_id="request-a")["already_running"] is True
        with pytest.raises(BootError, match="another provisioning"):
            driver.boot("mine-1", 0.0, booted_by="test", request_id="request-b")
        assert group_alive(int(str(first["pid"])))
    finally:
        driver.stop("mine-1", timeout_s=3)
    # Once it is gone, a new request gets a fresh machine.
    fresh = driver.boot("mine-1", 30.0, booted_by="test", request_id="request-b")
    driver.stop("mine-1", timeout_s=3)
    assert fresh["already_running"] is False
