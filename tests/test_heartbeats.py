"""Heartbeats: an ACTIVE guest reports its datastore's status; silence makes the instance UNKNOWN,
a datastore that is down SHUTDOWN, and the next good report ACTIVE again. Real processes: a private
broker, a taskmanager and local guests, with heartbeats every 0.3 s and an expiry of 2.5 s."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import pytest
import redis

from berth.ids import heartbeat_key
from berth.keys import GuestKey
from berth.records import Records, Status
from tests.helpers import wait_for_status, wait_until

FAST = {"BERTH_HEARTBEAT_INTERVAL_S": "0.3", "BERTH_HEARTBEAT_EXPIRY_S": "2.5", "BERTH_HEARTBEAT_CHECK_S": "0.1",
        "BERTH_HEARTBEAT_STALE_S": "1.0", "BERTH_GUEST_PING_TIMEOUT_S": "1.0"}


def provision(stack: Any, instance_id: str, datastore: str = "redis") -> Records:
    extra = ["--user", "app:app-pass-123", "--database", "app"] if datastore == "redis" else []
    stack.provision(instance_id, "--datastore", datastore, *extra)
    return Records(stack.client())


def after_heartbeats(records: Records, instance_id: str, count: int) -> Any:
    """The record once the taskmanager applied at least count heartbeats of the instance."""
    def enough() -> Any:
        record = records.get(instance_id)
        return record if record is not None and record.get("heartbeats", 0) >= count else None

    return wait_until(enough, 10, message=f"{count} heartbeats of {instance_id}")


def show(stack: Any, instance_id: str) -> dict[str, Any]:
    out = stack.cli("show", instance_id)
    assert out.returncode == 0, out.stdout + out.stderr
    return dict(json.loads(out.stdout))


def guest_pid(stack: Any, instance_id: str) -> int:
    pid = stack.guests().pid(instance_id)
    assert pid, f"no local guest for {instance_id}"
    return int(pid)


def send_report(stack: Any, instance_id: str, seq: int, datastore_status: str,
                as_instance: str | None = None) -> None:
    """A report pushed with the guest's own credentials and key, as its heartbeat thread would."""
    env = stack.guest_env(as_instance or instance_id)
    key = GuestKey.from_text(env["BERTH_GUEST_KEY"])
    report = {"instance_id": instance_id, "seq": seq, "sent_at": time.time(), "version": "test",
              "datastore": "redis", "datastore_status": datastore_status}
    client = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    envelope = json.dumps({"report": report, "mac": key.report_mac(report)})
    client.rpush(heartbeat_key(as_instance or instance_id), envelope)


def test_heartbeats_keep_an_instance_active_and_show_gives_their_age(stack: Any) -> None:
    stack.start_taskmanager(**FAST)
    records = provision(stack, "hb-live")
    record = after_heartbeats(records, "hb-live", 3)
    assert record.status is Status.ACTIVE
    assert record["heartbeat_datastore"] == "running"
    shown = show(stack, "hb-live")
    assert shown["status"] == "ACTIVE"
    assert 0 <= shown["last_heartbeat_age_s"] < 2.5
    # Still ACTIVE after several expiries' worth of time: the heartbeats keep coming.
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        assert records.get("hb-live").status is Status.ACTIVE  # type: ignore[union-attr]
        time.sleep(0.2)


def test_a_silent_guest_becomes_unknown_and_active_again_when_it_reports(stack: Any) -> None:
    tm = stack.start_taskmanager(**FAST)
    records = provision(stack, "hb-freeze", datastore="noop")
    after_heartbeats(records, "hb-freeze", 1)
    pid = guest_pid(stack, "hb-freeze")
    os.kill(pid, signal.SIGSTOP)
    try:
        frozen_at = time.monotonic()
        record = wait_for_status(records, "hb-freeze", [Status.UNKNOWN], timeout_s=15)
        # Not before the expiry: 2.5 s after the last heartbeat (both on the broker's clock).
        assert record["status_changed_at"] - record["last_heartbeat_at"] >= 2.5
        assert time.monotonic() - frozen_at >= 1.5
        assert show(stack, "hb-freeze")["last_heartbeat_age_s"] >= 2.5
        assert record.status is Status.UNKNOWN
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for_status(records, "hb-freeze", [Status.ACTIVE], timeout_s=15)

    def lines() -> list[str]:
        return [line for line in tm.log().splitlines() if "hb-freeze" in line and "step=heartbeat" in line]

    # Logged just after the record changed: wait for the line.
    wait_until(lambda: any("UNKNOWN -> ACTIVE" in line for line in lines()), 10, message="UNKNOWN -> ACTIVE logged")
    assert any("ACTIVE -> UNKNOWN" in line for line in lines()), lines()


def test_a_datastore_that_is_down_makes_the_instance_shutdown_and_restart_brings_it_back(stack: Any) -> None:
    stack.start_taskmanager(**FAST)
    records = provision(stack, "hb-down")
    server_pid = int((stack.guests().guest_dir("hb-down") / "redis" / "redis.pid").read_text())
    os.kill(server_pid, signal.SIGKILL)
    record = wait_for_status(records, "hb-down", [Status.SHUTDOWN], timeout_s=15)
    assert record["heartbeat_datastore"] == "down"
    # The guest API brings the datastore back; the next heartbeat makes the instance ACTIVE.
    out = stack.cli("restart", "hb-down")
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["status"] == "running"
    wait_for_status(records, "hb-down", [Status.ACTIVE], timeout_s=15)
    assert redis.Redis(port=record["connection"]["port"], username="app", password="app-pass-123").ping()


def test_out_of_order_and_foreign_heartbeats_change_nothing(stack: Any) -> None:
    tm = stack.start_taskmanager(**FAST)
    records = provision(stack, "hb-order", datastore="noop")
    provision(stack, "hb-other", datastore="noop")
    record = after_heartbeats(records, "hb-order", 2)
    # An old report saying the datastore is down: older than what was applied, so ignored.
    old_seq = int(record["heartbeat_seq"]) - 1_000_000
    send_report(stack, "hb-order", old_seq, "down")
    wait_until(lambda: "ignored an out-of-order heartbeat" in tm.log(), 10, message="out-of-order logged")
    assert records.get("hb-order").status is Status.ACTIVE  # type: ignore[union-attr]
    # A report about hb-order sent by hb-other's guest, on its own list, signed with its own key: refused.
    send_report(stack, "hb-order", time.time_ns() // 1000 + 5_000_000, "down", as_instance="hb-other")
    wait_until(lambda: "hb-other: refused a heartbeat" in tm.log(), 10, message="foreign report refused")
    # hb-other's user cannot write hb-order's heartbeat list at all.
    other = redis.Redis.from_url(stack.guest_env("hb-other")["CELERY_BROKER_URL"])
    with pytest.raises(redis.exceptions.NoPermissionError):
        other.rpush(heartbeat_key("hb-order"), "{}")
    assert records.get("hb-order").status is Status.ACTIVE  # type: ignore[union-attr]
    # The control: a current report saying down is applied (the guest, frozen, sends nothing
    # newer meanwhile), and the guest's next one, once it runs again, undoes it.
    pid = guest_pid(stack, "hb-order")
    os.kill(pid, signal.SIGSTOP)
    try:
        send_report(stack, "hb-order", time.time_ns() // 1000, "down")
        wait_for_status(records, "hb-order", [Status.SHUTDOWN], timeout_s=10)
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for_status(records, "hb-order", [Status.ACTIVE], timeout_s=10)


def test_delete_stops_watching_and_removes_the_heartbeat_list(stack: Any) -> None:
    stack.start_taskmanager(**FAST)
    records = provision(stack, "hb-del", datastore="noop")
    after_heartbeats(records, "hb-del", 1)
    out = stack.cli("delete", "hb-del", "--wait")
    assert out.returncode == 0, out.stdout + out.stderr
    client = stack.client()
    assert client.zscore("berth:heartbeat-index", "hb-del") is None
    assert not client.exists(heartbeat_key("hb-del"))
    assert "last_heartbeat_age_s" not in show(stack, "hb-del")


def test_a_new_taskmanager_node_watches_active_instances_nobody_watches(stack: Any) -> None:
    stack.start_taskmanager(**FAST)
    records = provision(stack, "hb-adopt", datastore="noop")
    client = stack.client()
    client.zrem("berth:heartbeat-index", "hb-adopt")  # as if its ACTIVE step died before watching it
    stack.start_taskmanager("tm2", **FAST)
    wait_until(lambda: client.zscore("berth:heartbeat-index", "hb-adopt") is not None, 15, message="watched again")
    count = records.get("hb-adopt").get("heartbeats", 0)  # type: ignore[union-attr]
    after_heartbeats(records, "hb-adopt", count + 2)
    assert any("nobody watched: hb-adopt" in tm.log() for tm in stack.taskmanagers)
