"""Partition drills: a guest in its own network namespace loses its link to the broker (the host end
of its veth taken down: its TCP connections stay open and stall), at each stage of its life.

- cut before the first ping: GUEST_UNREACHABLE at the ping deadline, for that instance only;
- cut in the middle of prepare and healed within the deadline: ACTIVE, applied once;
- cut in the middle of prepare and not healed: PREPARE_TIMEOUT; the guest that comes back
  applies nothing stale;
- cut after ACTIVE: UNKNOWN once heartbeats expire, ACTIVE again once healed.

While each partition is in force another instance provisions on the same stack, undisturbed.
One private stack (TLS broker, bridge, taskmanager) serves the whole module; every drill names
its own instances. Needs root (tests/netns.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from berth.records import InstanceRecord, Records
from tests.helpers import guest_journal, unique_id, wait_for_status, wait_until
from tests.netns import NetnsStack

pytestmark = pytest.mark.broker

EXPIRY_S = 2.5


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsStack]:
    # Heartbeats every 0.3 s, silence for 2.5 s makes an instance UNKNOWN: for the taskmanager and,
    # through the stack's environment, for every guest it boots.
    stack = NetnsStack(tmp_path_factory.mktemp("partitions"), BERTH_HEARTBEAT_INTERVAL_S="0.3",
                       BERTH_HEARTBEAT_EXPIRY_S=str(EXPIRY_S), BERTH_HEARTBEAT_CHECK_S="0.1",
                       BERTH_HEARTBEAT_STALE_S="1.0", BERTH_GUEST_PING_TIMEOUT_S="1.0")
    try:
        stack.start_taskmanager()
        yield stack
    finally:
        stack.guests().stop_all(timeout_s=3)  # a module's worth of guests, each stopped quickly
        stack.close()


def records(stack: NetnsStack) -> Records:
    return Records(stack.client())


def record(stack: NetnsStack, instance_id: str) -> InstanceRecord:
    found = records(stack).get(instance_id)
    assert found is not None, f"no record of {instance_id}"
    return found


def heartbeats(stack: NetnsStack, instance_id: str) -> int:
    return int(record(stack, instance_id).get("heartbeats", 0))


def status(stack: NetnsStack, instance_id: str, *statuses: str, timeout_s: float = 60) -> InstanceRecord:
    found: InstanceRecord = wait_for_status(records(stack), instance_id, statuses, timeout_s)
    return found


def start(stack: NetnsStack, instance_id: str, *args: str) -> None:
    """Submit a noop provisioning with the netns driver; the drill follows it through the record."""
    out = stack.cli("provision", instance_id, "--boot", "netns", "--datastore", "noop", *args)
    assert out.returncode == 0, out.stdout + out.stderr


def cut_during_prepare(stack: NetnsStack, instance_id: str, *, deadline_s: str, prepare_s: str) -> None:
    """Provision with a prepare that takes ``prepare_s``; cut the link once the guest has it."""
    start(stack, instance_id, "--prepare-deadline", deadline_s, "--config", f"prepare_seconds={prepare_s}")
    wait_until(lambda: counts(stack, instance_id, "deliveries") == [1], 60, message="prepare under way")
    stack.network.cut(instance_id)


def journal(stack: NetnsStack, instance_id: str) -> dict[str, Any]:
    return guest_journal(instance_id, stack.home)


def counts(stack: NetnsStack, instance_id: str, name: str) -> list[int]:
    return [int(n) for n in journal(stack, instance_id).get(name, {}).values()]


def guest_home(stack: NetnsStack, instance_id: str) -> Path:
    return stack.guests().guest_dir(instance_id)


def undisturbed(stack: NetnsStack) -> None:
    """Another instance provisions to ACTIVE, prepare applied once, while a partition is in force."""
    other = unique_id("bystander")
    start(stack, other)
    final = status(stack, other, "ACTIVE", "FAILED")
    assert final.status.value == "ACTIVE", final.fields
    assert final["prepare_applied"] == 1
    assert counts(stack, other, "applied") == [1]


def agent_log(stack: NetnsStack, instance_id: str) -> str:
    path = guest_home(stack, instance_id) / "agent.log"
    return path.read_text(errors="replace") if path.exists() else ""


def prepare_succeeded(stack: NetnsStack, instance_id: str) -> bool:
    """The guest's worker logged prepare's end: its result was stored (or the store gave up)."""
    return any("guest.prepare[" in line and " succeeded in " in line
               for line in agent_log(stack, instance_id).splitlines())


def answers_ping(stack: NetnsStack, instance_id: str) -> bool:
    pong = stack.cli("ping", instance_id, "--timeout", "5")
    return pong.returncode == 0 and json.loads(pong.stdout)["instance_id"] == instance_id


def test_a_guest_cut_off_before_its_first_ping_fails_unreachable_and_only_it(net: NetnsStack) -> None:
    instance_id = unique_id("cut-boot")
    # The agent waits out its boot delay before it connects: the link is down before it does.
    start(net, instance_id, "--boot-delay", "2", "--ping-deadline", "6")
    wait_until(lambda: (guest_home(net, instance_id) / "network.json").exists(), 30, message="guest's link up")
    net.network.cut(instance_id)
    try:
        undisturbed(net)
        failed = status(net, instance_id, "FAILED", "ACTIVE", timeout_s=30)
        assert failed.reason == "GUEST_UNREACHABLE", failed.fields
        # At the deadline, not before it (a generous bound after it: the check is a retry away).
        assert failed["ping_deadline_at"] <= failed["failed_at"] < failed["ping_deadline_at"] + 5
    finally:
        net.network.heal(instance_id)
    # Once healed the guest connects, and finds nothing to run: its queue was purged on FAILED.
    wait_until(lambda: answers_ping(net, instance_id), 60, interval_s=0.5, message="guest reachable after heal")
    assert journal(net, instance_id) == {}, "no prepare reached it"
    assert "guest.prepare[" not in agent_log(net, instance_id)


def test_a_partition_in_the_middle_of_prepare_healed_in_time_ends_active_applied_once(net: NetnsStack) -> None:
    instance_id = unique_id("cut-heal")
    cut_during_prepare(net, instance_id, deadline_s="40", prepare_s="1.5")
    try:
        undisturbed(net)
        # The guest finished prepare behind the cut: its answer waits for the link.
        wait_until(lambda: counts(net, instance_id, "applied") == [1], 30, message="prepare applied, answer held")
        assert record(net, instance_id).status.value == "BUILD"
    finally:
        net.network.heal(instance_id)
    final = status(net, instance_id, "ACTIVE", "FAILED", timeout_s=40)
    assert final.status.value == "ACTIVE", final.fields
    assert counts(net, instance_id, "applied") == [1], journal(net, instance_id)
    assert final["prepare_applied"] == 1
    assert final["active_at"] < final["prepare_deadline_at"], "healed within the deadline: ACTIVE in time"
    assert counts(net, instance_id, "rolled_back") == []


def test_a_partition_in_the_middle_of_prepare_not_healed_times_out_and_nothing_stale_runs(net: NetnsStack) -> None:
    instance_id = unique_id("cut-stay")
    # Prepare outlasts its deadline behind the cut: the guest cannot hear that the instance failed.
    cut_during_prepare(net, instance_id, deadline_s="4", prepare_s="5")
    try:
        undisturbed(net)
        failed = status(net, instance_id, "FAILED", "ACTIVE", timeout_s=30)
        assert failed.reason == "PREPARE_TIMEOUT", failed.fields
        wait_until(lambda: counts(net, instance_id, "rolled_back") == [1], 30, message="late prepare rolled back")
    finally:
        net.network.heal(instance_id)
    # The guest comes back: it answers a fresh ping, and whatever it held or finds applies nothing.
    wait_until(lambda: answers_ping(net, instance_id), 60, interval_s=0.5, message="guest back after heal")
    assert counts(net, instance_id, "applied") == [], journal(net, instance_id)
    assert counts(net, instance_id, "deliveries") == [1], "the stale prepare did not run again"
    assert not (guest_home(net, instance_id) / "noop.json").exists(), "nothing of the prepare remains"
    assert record(net, instance_id).status.value == "FAILED"


def test_an_answer_held_behind_a_partition_past_the_deadline_does_not_revive_the_instance(net: NetnsStack) -> None:
    instance_id = unique_id("cut-late")
    # Prepare finishes in time on the guest, but its answer cannot leave before the deadline.
    cut_during_prepare(net, instance_id, deadline_s="4", prepare_s="0.5")
    try:
        wait_until(lambda: counts(net, instance_id, "applied") == [1], 30, message="prepare applied, answer held")
        failed = status(net, instance_id, "FAILED", "ACTIVE", timeout_s=30)
        assert failed.reason == "PREPARE_TIMEOUT", failed.fields
    finally:
        net.network.heal(instance_id)
    # The answer gets out once healed, and finds the instance failed: it stays FAILED.
    wait_until(lambda: prepare_succeeded(net, instance_id), 60, interval_s=0.2, message="the held answer stored")
    wait_until(lambda: answers_ping(net, instance_id), 60, interval_s=0.5, message="guest back after heal")
    assert record(net, instance_id).status.value == "FAILED"
    assert counts(net, instance_id, "applied") == [1], "nothing applied again after the heal"
    assert counts(net, instance_id, "deliveries") == [1], journal(net, instance_id)


def test_a_partition_after_active_makes_the_instance_unknown_and_healing_active_again(net: NetnsStack) -> None:
    instance_id = unique_id("cut-live")
    start(net, instance_id)
    status(net, instance_id, "ACTIVE", timeout_s=60)
    wait_until(lambda: heartbeats(net, instance_id) >= 2, 20, message="heartbeats applied")
    net.network.cut(instance_id)
    try:
        unknown = status(net, instance_id, "UNKNOWN", timeout_s=20)
        assert unknown["status_changed_at"] - unknown["last_heartbeat_at"] >= EXPIRY_S
        undisturbed(net)
        assert record(net, instance_id).status.value == "UNKNOWN"
    finally:
        net.network.heal(instance_id)
    status(net, instance_id, "ACTIVE", timeout_s=60)
