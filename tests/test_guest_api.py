"""The guest API beyond prepare, against real guests and their real Redis datastores: from Python
(`workflows.api`), from the command line, with its errors; a call that times out is never applied
later, and a guest whose heartbeat is stale is pinged first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from berth.errors import (
    GuestError,
    GuestTimeout,
    InstanceNotFound,
    InstanceNotServing,
    InvalidInstanceId,
    InvalidRequest,
)
from berth.ids import kombu_lists, queue_lists
from berth.paths import PROJECT_DIR
from berth.records import Records, Status
from tasks.runtime import redis_client
from tests.helpers import wait_for_status, wait_until
from tests.test_heartbeats import FAST
from workflows import api, submit

APP_PASSWORD = "app-pass-123"
ANALYST_PASSWORD = "An4lyst-Secret-77"


def active_redis(new_id: Callable[[str], str], records: Records, prefix: str = "api") -> tuple[str, int]:
    instance_id = new_id(prefix)
    submit(instance_id, datastore="redis", users=[{"name": "app", "password": APP_PASSWORD}], databases=["app"])
    record = wait_for_status(records, instance_id)
    assert record.status is Status.ACTIVE, record.fields
    return instance_id, int(record["connection"]["port"])


def queued(client: redis.Redis, instance_id: str) -> list[str]:
    """Names of the tasks waiting on the guest's queue."""
    names = []
    for key in queue_lists(instance_id):
        for raw in client.lrange(key, 0, -1):
            names.append(json.loads(raw)["headers"]["task"])
    return names


@pytest.mark.usefixtures("taskmanager")
def test_databases_and_users_from_python(new_id: Callable[[str], str], records: Records) -> None:
    instance_id, port = active_redis(new_id, records)
    assert api.list_databases(instance_id) == ["app"]
    assert api.list_users(instance_id) == [{"name": "app", "databases": ["app"]}]
    assert api.create_database(instance_id, "reports") == {"database": "reports", "key_prefix": "reports:"}
    assert api.list_databases(instance_id) == ["app", "reports"]
    created = api.create_user(instance_id, "analyst", password=ANALYST_PASSWORD, databases=["reports"])
    assert created == {"name": "analyst", "databases": ["reports"]}
    analyst = redis.Redis(port=port, username="analyst", password=ANALYST_PASSWORD)
    assert analyst.set("reports:q1", "1")
    with pytest.raises(redis.exceptions.NoPermissionError):
        analyst.set("app:secret", "1")
    assert {"name": "analyst", "databases": ["reports"]} in api.list_users(instance_id)
    # The guest's own errors come back named.
    with pytest.raises(GuestError, match="user 'analyst' exists"):
        api.create_user(instance_id, "analyst", password=ANALYST_PASSWORD)
    with pytest.raises(GuestError, match="no database 'nope'"):
        api.create_user(instance_id, "other", password=ANALYST_PASSWORD, databases=["nope"])
    # Deleting a database removes its keys and every user's access to it.
    assert api.delete_database(instance_id, "reports") == {"database": "reports", "keys_removed": 1}
    assert {"name": "analyst", "databases": []} in api.list_users(instance_id)
    assert api.delete_user(instance_id, "analyst") == {"name": "analyst", "deleted": True}
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=port, username="analyst", password=ANALYST_PASSWORD).ping()
    assert [u["name"] for u in api.list_users(instance_id)] == ["app"]
    # The password travelled sealed: no key or value in Redis holds it.
    client = redis_client()
    for key in client.scan_iter(count=1000):
        assert ANALYST_PASSWORD not in key
        if client.type(key) == "string":
            assert ANALYST_PASSWORD not in (client.get(key) or "")
        elif client.type(key) == "list":
            assert not any(ANALYST_PASSWORD in v for v in client.lrange(key, 0, -1))
        elif client.type(key) == "hash":
            assert not any(ANALYST_PASSWORD in v for v in client.hgetall(key).values())


@pytest.mark.usefixtures("taskmanager")
def test_status_restart_and_a_cast(new_id: Callable[[str], str], records: Records) -> None:
    from tasks import app
    from tasks.drivers import LocalDriver

    instance_id, port = active_redis(new_id, records)
    status = api.get_status(instance_id)
    assert status["instance_id"] == instance_id and status["prepared"] is True
    assert status["datastore"]["status"] == "running"
    pidfile = LocalDriver().guest_dir(instance_id) / "redis" / "redis.pid"
    server_pid = pidfile.read_text()
    cast = api.restart(instance_id, cast=True)
    assert cast["guest_task_id"].startswith(f"{instance_id}.guest.restart.")
    restarted = app.AsyncResult(cast["guest_task_id"]).get(timeout=30)
    assert restarted["status"] == "running"
    assert pidfile.read_text() != server_pid, "a new redis-server process"
    assert redis.Redis(port=port, username="app", password=APP_PASSWORD).ping()


@pytest.mark.usefixtures("taskmanager")
def test_bad_calls_are_refused_before_anything_is_sent(new_id: Callable[[str], str], records: Records) -> None:
    instance_id, _ = active_redis(new_id, records)
    client = redis_client()
    with pytest.raises(InvalidRequest, match="'Reports' is not a valid database name"):
        api.create_database(instance_id, "Reports")
    with pytest.raises(InvalidRequest, match="password: must be 8-128"):
        api.create_user(instance_id, "bob", password="short")
    with pytest.raises(InvalidRequest, match="unknown guest operation 'drop_everything'"):
        api.call(instance_id, "drop_everything")  # type: ignore[attr-defined]
    with pytest.raises(InvalidRequest, match="timeout_s"):
        api.list_users(instance_id, timeout_s=0)
    with pytest.raises(InvalidInstanceId):
        api.list_users("../etc")
    with pytest.raises(InstanceNotFound):
        api.list_users(new_id("none"))
    assert queued(client, instance_id) == []
    failed = new_id("apif")
    submit(failed, datastore="noop", boot="none", ping_deadline_s=0.5)
    assert wait_for_status(records, failed).status is Status.FAILED
    with pytest.raises(InstanceNotServing, match=f"instance {failed} is FAILED"):
        api.list_users(failed)


@pytest.mark.usefixtures("taskmanager")
def test_a_call_that_times_out_is_never_applied_later(new_id: Callable[[str], str], records: Records) -> None:
    from tasks.drivers import LocalDriver

    instance_id, _ = active_redis(new_id, records)
    pid = LocalDriver().pid(instance_id)
    assert pid
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(GuestTimeout, match=f"guest of {instance_id} did not answer create_database within 1 s"):
            api.create_database(instance_id, "late", timeout_s=1.0)
        assert time.monotonic() - started < 5
        time.sleep(1.1)  # let the message's expiry pass while the guest is still frozen
    finally:
        os.kill(pid, signal.SIGCONT)
    # The guest, back, refuses the expired message instead of creating the database.
    assert api.list_databases(instance_id) == ["app"]


def cli(stack: Any, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return stack.cli(*args, stdin=stdin, timeout_s=60)  # type: ignore[no-any-return]


def test_the_command_line_and_the_ping_check_of_a_stale_guest(stack: Any) -> None:
    tm = stack.start_taskmanager(**FAST)
    stack.env.update(FAST)
    out = cli(stack, "provision", "cli-api", "--datastore", "redis", "--user", f"app:{APP_PASSWORD}",
              "--database", "app", "--wait")
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(cli(stack, "users", "cli-api").stdout) == [{"databases": ["app"], "name": "app"}]
    made = cli(stack, "create-user", "cli-api", "analyst", "--database", "app", "--password-stdin",
               stdin=ANALYST_PASSWORD + "\n")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout) == {"databases": ["app"], "name": "analyst"}
    assert ANALYST_PASSWORD not in made.stdout + made.stderr
    port = Records(stack.client()).get("cli-api")["connection"]["port"]  # type: ignore[index]
    assert redis.Redis(port=port, username="analyst", password=ANALYST_PASSWORD).ping()
    assert json.loads(cli(stack, "create-database", "cli-api", "reports").stdout)["database"] == "reports"
    assert json.loads(cli(stack, "databases", "cli-api").stdout) == ["app", "reports"]
    bad = cli(stack, "create-database", "cli-api", "Bad-Name")
    assert bad.returncode == 2 and "not a valid database name" in bad.stderr
    missing = cli(stack, "users", "no-such-1")
    assert missing.returncode == 1 and "no instance" in missing.stderr

    # Heartbeats fresh: no ping first. Stale (no taskmanager applies them) but the guest is alive:
    # the call pings first, then goes through.
    assert json.loads(cli(stack, "restart", "cli-api", "--cast").stdout)["pinged"] is False
    tm.signal(signal.SIGKILL)  # killed, it stops no guest; and nothing applies heartbeats any more
    tm.popen.wait()
    records = Records(stack.client())
    wait_until(lambda: time.time() - records.get("cli-api")["last_heartbeat_at"] > 1.2,  # type: ignore[index]
               10, message="heartbeat stale")
    out = cli(stack, "restart", "cli-api", "--cast")
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["pinged"] is True
    # Stale and the guest frozen: the ping goes unanswered and nothing else is sent.
    pid = stack.guests().pid("cli-api")
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        out = cli(stack, "users", "cli-api")
        assert out.returncode == 1
        assert "did not answer a ping within 1 s" in out.stderr and "nothing sent" in out.stderr
        assert time.monotonic() - started < 10
        assert "guest.list_users" not in queued(stack.client(), "cli-api")
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.mark.usefixtures("taskmanager")
def test_a_request_run_again_gets_the_first_answer_and_changes_nothing_twice(
        new_id: Callable[[str], str], records: Records) -> None:
    """A `workflows.create_database` whose taskmanager died while waiting runs again under the same
    request id: it finds the guest's first answer instead of creating the database a second time."""
    from tasks.guestapi import call, message_id

    instance_id, _ = active_redis(new_id, records)
    first = call(instance_id, "create_database", {"name": "twice"}, request_id="req-1")
    assert call(instance_id, "create_database", {"name": "twice"}, request_id="req-1") == first
    assert message_id(instance_id, "create_database", "req-1").startswith(f"{instance_id}.guest.create_database.")
    # Another request is another operation: the database exists by now.
    with pytest.raises(GuestError, match="database 'twice' exists"):
        call(instance_id, "create_database", {"name": "twice"}, request_id="req-2")


def test_a_password_given_by_position_is_refused_before_anything_is_sent() -> None:
    from tests.helpers import celery, project_env

    password = "Positional-Secret-99"
    out = subprocess.run(celery("-A", "tasks", "call", "workflows.create_user", "--args",
                                json.dumps(["db-1", "bob", password])),
                         cwd=PROJECT_DIR, env=project_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "give the password as a keyword" in out.stderr
    client = redis_client()
    for queue in ("guestapi", "taskmanager"):
        assert not any(password in raw for name in kombu_lists(queue) for raw in client.lrange(name, 0, -1))
