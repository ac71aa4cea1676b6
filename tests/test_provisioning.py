"""Provisioning end to end: real Redis, a real taskmanager process, real guest processes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import redis

from berth import __version__
from berth.errors import GuestUnreachable, InstanceExists, InvalidInstanceId, PrepareFailed, PrepareTimeout
from berth.paths import PROJECT_DIR, guest_dir
from berth.records import Reason, Records, Status
from tests.helpers import celery, project_env, send_to_guest, wait_for_status, wait_until
from workflows import provision_chain

pytestmark = [pytest.mark.broker, pytest.mark.usefixtures("taskmanager")]
STEP_TIMES = ["created_at", "queue_created_at", "booted_at", "ping_started_at", "guest_ready_at",
              "prepare_sent_at", "active_at"]


def run(*args: str, timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, cwd=PROJECT_DIR, env=project_env(),
                          timeout=timeout_s)


def test_the_python_chain_brings_a_local_guest_to_active_step_by_step(new_id: Callable[[str], str],
                                                                      records: Records) -> None:
    instance_id = new_id("py")
    summary = provision_chain(instance_id, datastore="noop").apply_async().get(timeout=60)
    assert summary["status"] == "ACTIVE" and summary["instance_id"] == instance_id
    record = records.get(instance_id)
    assert record is not None and record.status is Status.ACTIVE and record.reason is None
    times = [record[name] for name in STEP_TIMES]
    assert times == sorted(times), dict(zip(STEP_TIMES, times, strict=True))
    assert record["guest_version"] == __version__


def test_celery_call_from_a_shell_provisions_an_instance(new_id: Callable[[str], str], records: Records) -> None:
    instance_id = new_id("call")
    out = run(*celery("-A", "tasks", "call", "workflows.provision", "--args", json.dumps([instance_id]),
                      "--kwargs", json.dumps({"datastore": "noop"})))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip(), "celery call prints the task id"
    assert wait_for_status(records, instance_id).status is Status.ACTIVE


def test_cli_provision_wait_prints_each_step_and_exits_zero_on_active(new_id: Callable[[str], str]) -> None:
    instance_id = new_id("cli")
    out = run(sys.executable, "-m", "workflows", "provision", instance_id, "--datastore", "noop", "--wait")
    assert out.returncode == 0, out.stdout + out.stderr
    for line in (f"queue guest.{instance_id} created (+", "guest booted (driver local) (+", "guest answered ping ",
                 "prepare sent (+", "ACTIVE (+"):
        assert f"{instance_id}: {line}" in out.stdout, out.stdout
    shown = json.loads(run(sys.executable, "-m", "workflows", "show", instance_id).stdout)
    assert shown["status"] == "ACTIVE" and shown["active_at"].endswith("+00:00")
    assert instance_id in run(sys.executable, "-m", "workflows", "list").stdout


def test_cli_provision_wait_exits_non_zero_and_prints_the_reason_on_failure(new_id: Callable[[str], str]) -> None:
    instance_id = new_id("clif")
    out = run(sys.executable, "-m", "workflows", "provision", instance_id, "--boot", "none",
              "--ping-deadline", "1", "--wait")
    assert out.returncode == 1
    assert f"{instance_id}: FAILED GUEST_UNREACHABLE" in out.stdout


def test_a_guest_that_starts_after_several_failed_pings_ends_active(new_id: Callable[[str], str],
                                                                   records: Records) -> None:
    instance_id = new_id("late")
    provision_chain(instance_id, datastore="noop", boot_delay_s=2.5).apply_async().get(timeout=60)
    record = records.get(instance_id)
    assert record is not None and record.status is Status.ACTIVE
    assert record["ping_attempts"] >= 3
    assert record["guest_ready_at"] - record["ping_started_at"] >= 2.5


def test_no_guest_fails_guest_unreachable_within_the_deadline_plus_one_second(new_id: Callable[[str], str],
                                                                             records: Records) -> None:
    instance_id = new_id("gone")
    result = provision_chain(instance_id, datastore="noop", boot="none", ping_deadline_s=2).apply_async()
    with pytest.raises(GuestUnreachable, match="GUEST_UNREACHABLE"):
        result.get(timeout=30)
    record = records.get(instance_id)
    assert record is not None and record.status is Status.FAILED and record.reason == Reason.GUEST_UNREACHABLE
    waited = record["failed_at"] - record["ping_started_at"]
    assert 2.0 <= waited <= 3.0, waited


def test_a_prepare_that_raises_fails_prepare_failed_at_once_not_at_the_deadline(
        new_id: Callable[[str], str], records: Records) -> None:
    instance_id = new_id("pfail")
    result = provision_chain(instance_id, datastore="noop", prepare_deadline_s=120,
                             config={"fail": "disk full"}).apply_async()
    with pytest.raises(PrepareFailed, match="disk full"):
        result.get(timeout=60)
    record = records.get(instance_id)
    assert record is not None and record.reason == Reason.PREPARE_FAILED
    assert "PrepareError: disk full" in record["error"]
    assert record["failed_at"] - record["prepare_sent_at"] < 10, "failed at once, long before the 120 s deadline"


def test_a_redis_prepare_error_carries_the_guests_own_message(new_id: Callable[[str], str],
                                                             records: Records) -> None:
    instance_id = new_id("rfail")
    result = provision_chain(instance_id, datastore="redis", config={"maxmemory": "lots"}).apply_async()
    with pytest.raises(PrepareFailed):
        result.get(timeout=60)
    record = records.get(instance_id)
    assert record is not None and record.reason == Reason.PREPARE_FAILED
    assert "argument must be a memory value" in record["error"]


def test_a_prepare_slower_than_its_deadline_fails_prepare_timeout(new_id: Callable[[str], str],
                                                                 records: Records) -> None:
    instance_id = new_id("slow")
    result = provision_chain(instance_id, datastore="noop", prepare_deadline_s=1,
                             config={"prepare_seconds": 4}).apply_async()
    with pytest.raises(PrepareTimeout):
        result.get(timeout=30)
    record = records.get(instance_id)
    assert record is not None and record.reason == Reason.PREPARE_TIMEOUT
    assert record["failed_at"] - record["prepare_sent_at"] <= 2.5, "at the 1 s deadline, not long after"


def test_the_redis_datastore_accepts_the_provisioned_password_and_refuses_a_wrong_one(
        new_id: Callable[[str], str], records: Records) -> None:
    instance_id = new_id("rds")
    users = [{"name": "app", "password": "correct-horse-1"}, {"name": "report", "password": "battery-staple-2"}]
    provision_chain(instance_id, datastore="redis", users=users, databases=["app", "stats"]).apply_async().get(60)
    record = records.get(instance_id)
    assert record is not None
    host, port = record["connection"]["host"], record["connection"]["port"]

    app = redis.Redis(host=host, port=port, username="app", password="correct-horse-1", decode_responses=True)
    app.set("app:greeting", "hello")
    app.set("stats:visits", 1)
    assert app.get("app:greeting") == "hello"
    with pytest.raises(redis.exceptions.NoPermissionError):
        app.set("other:key", 1)  # outside the requested databases' namespaces
    with pytest.raises(redis.exceptions.NoPermissionError):
        app.flushall()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host=host, port=port, username="app", password="wrong-password").ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host=host, port=port, username="report", password="correct-horse-1").ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host=host, port=port).ping()  # the default user is off
    report = redis.Redis(host=host, port=port, username="report", password="battery-staple-2")
    assert report.get("stats:visits") == b"1"


def test_bad_ids_are_refused_at_every_entry_point_and_create_nothing(records: Records) -> None:
    from tasks.runtime import redis_client

    bad = "Bad_Id"
    with pytest.raises(InvalidInstanceId, match="expected 1-40 characters"):
        provision_chain(bad)
    out = run(sys.executable, "-m", "workflows", "provision", bad, "--wait")
    assert out.returncode == 2 and "invalid instance_id" in out.stderr
    call = run(*celery("-A", "tasks", "call", "workflows.provision", "--args", json.dumps([bad])))
    task_id = call.stdout.strip()
    from celery.result import AsyncResult

    with pytest.raises(InvalidInstanceId, match="instance_id"):
        AsyncResult(task_id).get(timeout=30)
    guest = run(*celery("-A", "guest", "worker", "--instance-id", bad), timeout_s=60)
    assert guest.returncode != 0 and "--instance-id" in guest.stderr
    assert records.get(bad) is None
    assert not [k for k in redis_client().scan_iter(match=f"*{bad}*")]


def test_a_second_provisioning_of_a_live_id_is_refused(new_id: Callable[[str], str]) -> None:
    instance_id = new_id("dup")
    provision_chain(instance_id, datastore="noop").apply_async().get(timeout=60)
    from workflows.tasks import provision

    with pytest.raises(InstanceExists, match="already exists"):
        provision.delay(instance_id, datastore="noop").get(timeout=30)
    out = run(sys.executable, "-m", "workflows", "provision", instance_id)
    assert out.returncode == 1 and "already exists (status ACTIVE)" in out.stderr


def test_a_late_guest_of_a_failed_instance_runs_nothing(new_id: Callable[[str], str], records: Records,
                                                       start_guest: Callable[[str], Any]) -> None:
    from tasks.runtime import redis_client

    instance_id = new_id("stale")
    with pytest.raises(GuestUnreachable):
        provision_chain(instance_id, datastore="noop", boot="none", ping_deadline_s=1).apply_async().get(30)
    assert redis_client().llen(f"guest.{instance_id}") == 0, "stale pings are dropped when the instance fails"
    guest = start_guest(instance_id)
    wait_until(lambda: " ready." in guest.log(), 30, message="late guest ready")
    # Prove the guest is consuming: a fresh message gets an answer ...
    probe = send_to_guest(instance_id, "guest.ping", "probe")
    assert probe.get(timeout=20)["instance_id"] == instance_id
    # ... and yet nothing of the failed build ran on it.
    assert "guest.prepare" not in guest.log().split(" ready.", 1)[1]
    assert f"{instance_id}.guest.ping" not in guest.log()
    assert not (guest_dir(instance_id) / "prepare.json").exists()
    record = records.get(instance_id)
    assert record is not None and record.status is Status.FAILED


def _soon() -> Any:
    import datetime as dt

    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=60)


def test_cli_provision_wait_shows_the_wait_for_a_late_guest_with_attempts_and_time_left(
        new_id: Callable[[str], str]) -> None:
    instance_id = new_id("clil")
    out = run(sys.executable, "-m", "workflows", "provision", instance_id, "--datastore", "noop",
              "--boot-delay", "1.5", "--ping-deadline", "20", "--wait")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [line.removeprefix(f"{instance_id}: ") for line in out.stdout.splitlines()]
    waiting = [line for line in lines if line.startswith("waiting for guest: ping ")]
    assert len(waiting) >= 2, out.stdout
    attempts = [int(line.split()[4]) for line in waiting]
    left = [float(line.split(", ")[1].split()[0]) for line in waiting]
    assert attempts == sorted(set(attempts)), "one line per ping, in order"
    assert left == sorted(left, reverse=True) and 0 < left[-1] < 20
    order = [next(i for i, line in enumerate(lines) if line.startswith(prefix)) for prefix in (
        "queue guest.", "guest booted", "waiting for guest", "guest answered ping", "prepare sent", "ACTIVE")]
    assert order == sorted(order), out.stdout


def test_on_a_terminal_the_wait_is_one_line_rewritten_in_place_and_its_last_state_stays() -> None:
    import io

    from workflows.cli import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    progress = Progress("db-1", out)
    created = "queue guest.db-1 created (+0.01 s)"
    for lines in ([created], [created, "waiting for guest: ping 1 sent, 9.9 s left"],
                  [created, "waiting for guest: ping 1 sent, 9.8 s left"],
                  [created, "waiting for guest: ping 2 sent, 9.5 s left"],
                  [created, "guest answered ping 2 (agent 0.1.0) (+0.5 s)"]):
        progress.show(lines)
    shown = out.getvalue()
    assert shown.count(created) == 1
    # Each state of the wait overwrites the last (carriage return, erase line), none ends a line ...
    assert shown.count("\r\033[Kdb-1: waiting for guest: ping ") == 3
    # ... until the guest answers: the wait's last state stays, the answer goes on the next line.
    assert shown.endswith("ping 2 sent, 9.5 s left\ndb-1: guest answered ping 2 (agent 0.1.0) (+0.5 s)\n")


@pytest.mark.usefixtures("taskmanager")
def test_a_long_prepare_is_seen_done_the_moment_the_guest_answers(new_id: Callable[[str], str],
                                                                 records: Records) -> None:
    """verify looks with backoff (up to 1 s apart); the taskmanager's listener sees the answer's publish."""
    import datetime as dt

    from berth.ids import prepare_task_id, result_key
    from tasks.runtime import redis_client
    from workflows import submit

    instance_id = new_id("long")
    submit(instance_id, datastore="noop", config={"prepare_seconds": 2.0})
    record = wait_for_status(records, instance_id)
    assert record.status is Status.ACTIVE
    meta = json.loads(redis_client().get(result_key(prepare_task_id(instance_id, record["request_id"]))) or "{}")
    done = dt.datetime.fromisoformat(meta["date_done"]).replace(tzinfo=dt.UTC).timestamp()
    assert 0 <= record["active_at"] - done < 0.25, record["active_at"] - done
