"""Crash drills with real processes: whatever dies, and whenever, prepare happens exactly once.

Each drill runs on a private stack (its own broker, taskmanager and guest disks), kills a
real process with SIGKILL (or freezes it with SIGSTOP), brings it back, and then checks the
instance's final status, the guest's journal (delivered N times, applied once) and the
instance record, which carries the same counts for the operator.
"""

from __future__ import annotations

import json
import signal
from typing import Any

import pytest

from berth.records import InstanceRecord, Records
from tasks.drivers import LocalDriver
from tests.brokers import on_rabbitmq
from tests.helpers import Proc, guest_command, guest_journal, unique_id, wait_for_status, wait_until
from tests.stack import Stack

pytestmark = pytest.mark.broker

# Each drill runs twice on Redis; once on RabbitMQ, whose session repeats the broker-facing suite.
ITERATIONS = 1 if on_rabbitmq() else 2




def journal(stack: Stack, instance_id: str) -> dict[str, Any]:
    return guest_journal(instance_id, stack.home)


def counts(stack: Stack, instance_id: str, name: str) -> list[int]:
    return [int(n) for n in journal(stack, instance_id).get(name, {}).values()]


def record(stack: Stack, instance_id: str) -> InstanceRecord:
    found = Records(stack.client()).get(instance_id)
    assert found is not None, f"no record of {instance_id}"
    return found


def wait_status(stack: Stack, instance_id: str, *statuses: str, timeout_s: float = 60) -> InstanceRecord:
    found: InstanceRecord = wait_for_status(Records(stack.client()), instance_id, statuses, timeout_s)
    return found


def provision(stack: Stack, instance_id: str, *args: str) -> None:
    out = stack.cli("provision", instance_id, "--datastore", "noop", *args)
    assert out.returncode == 0, out.stdout + out.stderr  # (no --wait: the drills watch the steps themselves)


def start_guest(stack: Stack, instance_id: str) -> Proc:
    """The guest of a provisioned instance, started by hand with its own user and key."""
    return Proc(guest_command(instance_id), stack.root / "logs" / f"guest-{instance_id}.log",
                env=stack.guest_env(instance_id))


def kill(proc: Proc) -> None:
    proc.signal(signal.SIGKILL)
    proc.popen.wait()


def transitions_to(stack: Stack, instance_id: str, status: str) -> int:
    """How many times the taskmanagers' logs show the instance entering status."""
    logs = "".join(tm.log() for tm in stack.taskmanagers)
    return sum(1 for line in logs.splitlines() if f"instance {instance_id}: " in line and f"-> {status} " in line)


def assert_applied_once(stack: Stack, instance_id: str, late_deliveries: bool = False,
                        active_when_killed: bool = False) -> InstanceRecord:
    """ACTIVE, applied once by the guest, and the record's audit agrees with the guest's journal.

    The record holds the guest's counts as verify saw them. Where an ack can be lost with the broker
    (late_deliveries), the guest may get the prepare again after ACTIVE: its journal then counts more
    deliveries than the record, and still one application.
    """
    final = wait_status(stack, instance_id, "ACTIVE", "FAILED", timeout_s=90)
    assert final.status.value == "ACTIVE", (f"{instance_id}: {final.status.value} {final.reason}: "
                                            f"{final.get('error')}", final.fields)
    assert counts(stack, instance_id, "applied") == [1], journal(stack, instance_id)
    assert final["prepare_applied"] == 1
    delivered = counts(stack, instance_id, "deliveries")[0]
    if late_deliveries:
        assert 1 <= final["prepare_deliveries"] <= delivered, (final.fields, journal(stack, instance_id))
    else:
        assert final["prepare_deliveries"] == delivered
    # The line is written just after the record changed (by a step, or by the taskmanager's main
    # process when it sees prepare's answer: tasks/answers.py): wait for it, then count. A process
    # killed between the two (active_when_killed) took its line with it; never is it logged twice.
    if active_when_killed:
        assert transitions_to(stack, instance_id, "ACTIVE") <= 1
    else:
        wait_until(lambda: transitions_to(stack, instance_id, "ACTIVE") >= 1, 20, message="ACTIVE logged")
        assert transitions_to(stack, instance_id, "ACTIVE") == 1
    return final


# --- The taskmanager dies at each step of the chain ---------------------------------------------


@pytest.mark.parametrize("iteration", range(ITERATIONS))
@pytest.mark.parametrize("point", ["create_queue.done", "send_prepare.done"])
def test_taskmanager_killed_at_a_crash_point_resumes_the_chain_on_restart(
        stack: Stack, point: str, iteration: int) -> None:
    instance_id = unique_id("tmkill")
    marker_dir = stack.root / "failpoints"
    tm = stack.start_taskmanager(BERTH_FAILPOINTS=point, BERTH_FAILPOINT_DIR=str(marker_dir))
    provision(stack, instance_id)
    wait_until(lambda: (marker_dir / point).exists(), 60, message=f"taskmanager stopped at {point}")
    kill(tm)
    # After send_prepare the guest answers while the step is held: the taskmanager's listener
    # (tasks/answers.py, in its main process) may have made the instance ACTIVE before the kill.
    allowed = ("BUILD",) if point == "create_queue.done" else ("BUILD", "ACTIVE")
    status_when_killed = record(stack, instance_id).status.value
    assert status_when_killed in allowed
    stack.start_taskmanager()
    final = assert_applied_once(stack, instance_id, active_when_killed=status_when_killed == "ACTIVE")
    assert final["boots"] == 1, "the guest was booted once"
    assert final["prepare_sent"] == 1, "prepare was published once, before the crash or after it"
    if stack.broker.kind == "redis":  # RabbitMQ requeues what a closed connection held by itself
        assert "restored" in stack.taskmanagers[-1].log(), "the restarted node took its messages back at once"


@pytest.mark.parametrize("iteration", range(ITERATIONS))
def test_taskmanager_killed_while_waiting_for_the_ping_finishes_after_restart(stack: Stack, iteration: int) -> None:
    instance_id = unique_id("tmping")
    tm = stack.start_taskmanager()
    # The guest takes 4 s to boot: the taskmanager is mid-backoff when it dies.
    provision(stack, instance_id, "--boot-delay", "4", "--ping-deadline", "60")
    wait_until(lambda: record(stack, instance_id).get("ping_attempts", 0) >= 2, 30, message="pinging")
    kill(tm)
    stack.start_taskmanager()
    final = assert_applied_once(stack, instance_id)
    assert final["boots"] == 1


@pytest.mark.parametrize("iteration", range(ITERATIONS))
def test_taskmanager_killed_while_verifying_finishes_after_restart(stack: Stack, iteration: int) -> None:
    instance_id = unique_id("tmverify")
    tm = stack.start_taskmanager()
    provision(stack, instance_id, "--config", "prepare_seconds=3")
    wait_until(lambda: counts(stack, instance_id, "deliveries") == [1], 60, message="prepare running on the guest")
    kill(tm)
    assert not counts(stack, instance_id, "applied"), "killed while the guest was still preparing"
    stack.start_taskmanager()
    final = assert_applied_once(stack, instance_id)
    assert final["prepare_sent"] == 1 and final["prepare_deliveries"] == 1


# --- The broker dies in the middle of a batch ----------------------------------------------------


@pytest.mark.parametrize("iteration", range(ITERATIONS))
def test_broker_killed_mid_batch_and_restarted_from_its_aof_loses_nothing(stack: Stack, iteration: int) -> None:
    stack.start_taskmanager()
    ids = [unique_id("brk") for _ in range(6)]
    for instance_id in ids:
        provision(stack, instance_id, "--config", "prepare_seconds=1.5")
    # Some guests are preparing, others still booting: then the broker dies.
    wait_until(lambda: any(counts(stack, i, "deliveries") for i in ids), 60, message="a prepare under way")
    stack.broker.kill()
    stack.broker.start()
    for instance_id in ids:
        assert_applied_once(stack, instance_id, late_deliveries=True)


# --- Guests: killed mid-prepare, frozen past a deadline ---------------------------------------------


@pytest.mark.parametrize("iteration", range(ITERATIONS))
def test_guest_killed_mid_prepare_gets_it_again_on_restart_and_applies_it_once(stack: Stack, iteration: int) -> None:
    instance_id = unique_id("gkill")
    stack.start_taskmanager()
    provision(stack, instance_id, "--boot", "none", "--prepare-deadline", "60", "--config", "prepare_seconds=2")
    guest = start_guest(stack, instance_id)
    wait_until(lambda: counts(stack, instance_id, "deliveries") == [1], 60, message="prepare under way")
    kill(guest)
    assert not counts(stack, instance_id, "applied")
    restarted = start_guest(stack, instance_id)
    try:
        final = assert_applied_once(stack, instance_id)
        assert final["prepare_deliveries"] == 2, "delivered again after the crash, applied once"
        if stack.broker.kind == "redis":  # RabbitMQ requeued it when the killed guest's connection closed
            assert "restored 1 message(s)" in restarted.log()
    finally:
        restarted.stop()


@pytest.mark.parametrize("iteration", range(ITERATIONS))
def test_guest_frozen_before_the_ping_fails_the_instance_and_runs_nothing_stale(stack: Stack, iteration: int) -> None:
    instance_id = unique_id("gstop")
    # The guest's key exists once the request does: hold the chain after create_queue, start the
    # guest and freeze it while it waits for its first message, then let a new taskmanager go on.
    marker_dir = stack.root / "failpoints"
    held = stack.start_taskmanager(BERTH_FAILPOINTS="create_queue.done", BERTH_FAILPOINT_DIR=str(marker_dir))
    provision(stack, instance_id, "--boot", "none", "--ping-deadline", "2")
    wait_until(lambda: (marker_dir / "create_queue.done").exists(), 60, message="chain held after create_queue")
    guest = start_guest(stack, instance_id)
    try:
        wait_until(lambda: " ready." in guest.log(), 60, message="guest ready")
        guest.signal(signal.SIGSTOP)
        kill(held)
        stack.start_taskmanager()
        failed = wait_status(stack, instance_id, "FAILED", "ACTIVE", timeout_s=30)
        assert failed.reason == "GUEST_UNREACHABLE", failed.fields
        guest.signal(signal.SIGCONT)
        # The frozen guest wakes to an emptied queue: a fresh ping is the first thing it runs.
        pong = stack.cli("ping", instance_id, "--timeout", "20")
        assert pong.returncode == 0, pong.stderr
        assert json.loads(pong.stdout)["instance_id"] == instance_id
        assert journal(stack, instance_id) == {}, "no prepare ran"
        assert "guest.prepare[" not in guest.log().split(" ready.", 1)[1]
    finally:
        guest.signal(signal.SIGCONT)
        guest.stop()


@pytest.mark.parametrize("iteration", range(ITERATIONS))
def test_guest_frozen_mid_prepare_past_its_deadline_rolls_it_back_when_thawed(stack: Stack, iteration: int) -> None:
    instance_id = unique_id("gfreeze")
    stack.start_taskmanager()
    provision(stack, instance_id, "--boot", "none", "--prepare-deadline", "3", "--config", "prepare_seconds=1")
    guest = start_guest(stack, instance_id)
    try:
        wait_until(lambda: counts(stack, instance_id, "deliveries") == [1], 60, message="prepare under way")
        guest.signal(signal.SIGSTOP)
        failed = wait_status(stack, instance_id, "FAILED", "ACTIVE", timeout_s=30)
        assert failed.reason == "PREPARE_TIMEOUT", failed.fields
        guest.signal(signal.SIGCONT)
        wait_until(lambda: counts(stack, instance_id, "rolled_back") == [1], 30, message="late prepare rolled back")
        assert counts(stack, instance_id, "applied") == []
        assert not (LocalDriver(stack.home).guest_dir(instance_id) / "noop.json").exists(), "nothing of it remains"
    finally:
        guest.signal(signal.SIGCONT)
        guest.stop()
