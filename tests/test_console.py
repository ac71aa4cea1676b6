"""A console that tells the truth: every guest message ends in Flower as the taskmanager saw it,
and `show`, `list` and the metrics say where each guest connects from and how."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from berth.errors import GuestTimeout
from berth.ids import guest_task_prefix, instance_of
from berth.records import Records, Status
from tasks import outcomes
from tasks.drivers import LocalDriver
from tests.helpers import FlowerClient, unique_id, wait_for_status, wait_until, workflows_cli
from workflows import api, submit, submit_delete

pytestmark = [pytest.mark.broker, pytest.mark.usefixtures("taskmanager")]
FINAL = {"SUCCESS", "FAILURE", "EXPIRED", "REVOKED"}


def guest_messages(flower: FlowerClient, instance_id: str) -> dict[str, dict[str, Any]]:
    """Every guest message of the instance Flower knows of: task id -> its task info."""
    tasks = flower.call("/api/tasks?limit=100000")
    return {task_id: info for task_id, info in tasks.items() if task_id.startswith(guest_task_prefix(instance_id))}


def settled(flower: FlowerClient, instance_id: str, names: set[str]) -> dict[str, dict[str, Any]]:
    """The instance's guest messages once Flower shows each of ``names`` and every one in a final state."""

    def done() -> dict[str, dict[str, Any]]:
        shown = guest_messages(flower, instance_id)
        ready = names <= {i.get("name") for i in shown.values()} and all(i["state"] in FINAL for i in shown.values())
        return shown if ready else {}

    return wait_until(done, 60, interval_s=0.2, message=f"every guest message of {instance_id} final in flower")


def by_name(shown: dict[str, dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [info for info in shown.values() if info.get("name") == name]


def test_a_late_guest_leaves_no_ping_pending_in_flower(flower: FlowerClient, new_id: Callable[[str], str],
                                                       records: Records) -> None:
    instance_id = new_id("cpl")
    submit(instance_id, datastore="noop", boot_delay_s=2.0)
    record = wait_for_status(records, instance_id, [Status.ACTIVE])
    shown = settled(flower, instance_id, {"guest.ping", "guest.prepare"})
    pings = by_name(shown, "guest.ping")
    assert len(pings) == record["ping_attempts"] >= 2, [(p["uuid"], p["state"]) for p in pings]
    assert "SUCCESS" in {p["state"] for p in pings}
    # Pings sent before the guest was up expired (unread, or refused by the guest as too late).
    assert {p["state"] for p in pings} <= {"SUCCESS", "EXPIRED"}
    [prepare] = by_name(shown, "guest.prepare")
    assert prepare["state"] == "SUCCESS" and "connection" in prepare["result"]


def test_the_pings_of_a_guest_that_never_starts_expire(flower: FlowerClient, new_id: Callable[[str], str],
                                                       records: Records) -> None:
    instance_id = new_id("cpn")
    submit(instance_id, datastore="noop", boot="none", ping_deadline_s=2.0)
    record = wait_for_status(records, instance_id, [Status.FAILED])
    assert record.reason == "GUEST_UNREACHABLE"
    shown = settled(flower, instance_id, {"guest.ping"})
    assert len(shown) == record["ping_attempts"] >= 2
    assert {i["state"] for i in shown.values()} == {"EXPIRED"}
    info = flower.call(f"/api/task/info/{next(iter(shown))}")
    assert info["state"] == "EXPIRED" and info["name"] == "guest.ping"


def test_a_failing_prepare_shows_failure_with_the_guests_error(flower: FlowerClient, new_id: Callable[[str], str],
                                                               records: Records) -> None:
    instance_id = new_id("cpf")
    submit(instance_id, datastore="noop", prepare_deadline_s=120, config={"fail": "disk full"})
    assert wait_for_status(records, instance_id, [Status.FAILED]).reason == "PREPARE_FAILED"
    [prepare] = by_name(settled(flower, instance_id, {"guest.prepare"}), "guest.prepare")
    assert prepare["state"] == "FAILURE" and "disk full" in prepare["exception"]


def test_a_prepared_password_never_reaches_flower_through_an_outcome(
        flower: FlowerClient, new_id: Callable[[str], str], records: Records) -> None:
    password = "Outcome-Secret-77"
    instance_id = new_id("cps")
    submit(instance_id, datastore="redis", users=[{"name": "app", "password": password}], databases=["app"])
    wait_for_status(records, instance_id, [Status.ACTIVE])
    shown = settled(flower, instance_id, {"guest.ping", "guest.prepare"})
    [prepare] = by_name(shown, "guest.prepare")
    assert prepare["state"] == "SUCCESS" and "'app'" in prepare["result"]
    assert password not in json.dumps(shown) + flower.raw(f"/api/task/info/{prepare['uuid']}")


def test_guest_api_calls_end_success_failure_or_expired(flower: FlowerClient, new_id: Callable[[str], str],
                                                        records: Records) -> None:
    instance_id = new_id("cpa")
    submit(instance_id, datastore="redis", databases=["app"])
    wait_for_status(records, instance_id, [Status.ACTIVE])
    assert api.list_databases(instance_id) == ["app"]
    with pytest.raises(Exception, match="cannot|exist|unknown|no database"):
        api.delete_database(instance_id, "nosuch")
    pid = LocalDriver().pid(instance_id)
    assert pid
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(GuestTimeout):
            api.create_database(instance_id, "late", timeout_s=1.0)
        shown = settled(flower, instance_id, {"guest.list_databases", "guest.delete_database",
                                              "guest.create_database"})
    finally:
        os.kill(pid, signal.SIGCONT)
    assert [i["state"] for i in by_name(shown, "guest.list_databases")] == ["SUCCESS"]
    assert [i["state"] for i in by_name(shown, "guest.delete_database")] == ["FAILURE"]
    assert [i["state"] for i in by_name(shown, "guest.create_database")] == ["EXPIRED"]


def test_delete_revokes_what_the_guest_never_answered(flower: FlowerClient, new_id: Callable[[str], str],
                                                      records: Records) -> None:
    instance_id = new_id("cpd")
    # No guest: the chain pings until the delete comes.
    submit(instance_id, datastore="noop", boot="none", ping_deadline_s=120)
    wait_until(lambda: getattr(records.get(instance_id), "fields", {}).get("ping_attempts", 0) >= 2, 30,
               message="pinging")
    submit_delete(instance_id)
    wait_for_status(records, instance_id, [Status.DELETED], timeout_s=60)
    shown = settled(flower, instance_id, {"guest.ping"})
    assert "REVOKED" in {i["state"] for i in shown.values()}
    assert {i["state"] for i in shown.values()} <= {"REVOKED", "EXPIRED"}


def test_show_list_and_metrics_say_where_the_guest_connects_from_and_how(
        flower: FlowerClient, new_id: Callable[[str], str], records: Records) -> None:
    instance_id = new_id("cpw")
    submit(instance_id, datastore="noop")
    record = wait_for_status(records, instance_id, [Status.ACTIVE])
    assert (record["guest_host"], record["guest_transport"]) == ("127.0.0.1", "plain")
    shown = workflows_cli("show", instance_id)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert (data["guest_host"], data["guest_transport"], data["guest_connected"]) == ("127.0.0.1", "plain", True)
    listed = workflows_cli("list")
    [line] = [row for row in listed.stdout.splitlines() if row.startswith(instance_id + " ")]
    assert "127.0.0.1" in line.split() and "plain" in line.split()
    _, metrics = flower.get("/metrics", auth=False)
    assert (f'berth_guest_connection_info{{host="127.0.0.1",instance_id="{instance_id}",transport="plain"}} 1.0'
            in metrics), [m for m in metrics.splitlines() if "berth_guest" in m]


def test_an_outcome_is_told_once_and_one_that_could_not_be_sent_keeps_its_state(
        flower: FlowerClient, monkeypatch: pytest.MonkeyPatch) -> None:
    task_id = f"{unique_id('cpo')}.guest.ping0.x"
    outcomes.expect(task_id, "guest.ping", time.time() + 3600)

    def broker_away(*_: Any) -> None:
        raise ConnectionError("broker away")

    with monkeypatch.context() as patched:
        patched.setattr(outcomes, "_send", broker_away)
        assert not outcomes.settle(task_id, outcomes.Outcome(outcomes.EXPIRED, "first decision"))
    # Told later (here, or by a taskmanager's sweeper first) with the outcome decided first.
    outcomes.settle(task_id, outcomes.Outcome(outcomes.SUCCESS, "'late'"))
    assert not outcomes.settle(task_id, outcomes.Outcome(outcomes.SUCCESS, "'again'"))
    info = wait_until(lambda: guest_messages(flower, instance_of(task_id)).get(task_id) or {}, 20, message="told")
    assert (info["state"], info["exception"], info["name"]) == ("EXPIRED", "first decision", "guest.ping")
