"""Flower's API as an entry point, and passwords kept out of Flower, logs and Redis."""

from __future__ import annotations

import base64
import json
import os
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from berth.ids import step_task_id
from berth.paths import guests_root
from berth.records import Records, Status
from berth.redis_server import free_port
from tasks.runtime import redis_client
from tests.helpers import FLOWER_AUTH, FlowerClient, Proc, celery, project_env, wait_for_status, wait_until
from workflows import provision_chain

pytestmark = [pytest.mark.broker, pytest.mark.usefixtures("taskmanager")]
AUTH = FLOWER_AUTH
PASSWORD = "Sup3r-Secret-Value-42"


def dump(client: Any, key: str) -> Any:
    """Whatever a key holds, whatever its type."""
    readers = {"string": client.get, "hash": client.hgetall, "set": client.smembers,
               "list": lambda k: client.lrange(k, 0, -1), "zset": lambda k: client.zrange(k, 0, -1)}
    return readers.get(client.type(key), lambda k: "")(key)


def test_flower_send_task_api_starts_a_provisioning(flower: FlowerClient, new_id: Callable[[str], str],
                                                   records: Records) -> None:
    instance_id = new_id("flw")
    reply = flower.call("/api/task/send-task/workflows.provision",
                        {"args": [instance_id], "kwargs": {"datastore": "noop"}})
    assert reply["task-id"]
    record = wait_for_status(records, instance_id, [Status.ACTIVE])
    assert record.status is Status.ACTIVE
    # The chain's steps show in Flower as named tasks carrying the instance id.
    tasks = wait_until(lambda: {t["name"] for t in flower.call("/api/tasks?limit=1000").values()
                                if instance_id in str(t.get("args"))} >= {
        "taskmanager.create_queue", "taskmanager.ping_guest", "taskmanager.verify"} and True, 20,
                       message="steps in flower")
    assert tasks


def test_flower_send_task_api_deletes_an_active_instance(flower: FlowerClient, new_id: Callable[[str], str],
                                                        records: Records) -> None:
    instance_id = new_id("fdl")
    flower.call("/api/task/send-task/workflows.provision", {"args": [instance_id], "kwargs": {"datastore": "noop"}})
    assert wait_for_status(records, instance_id, [Status.ACTIVE]).status is Status.ACTIVE
    reply = flower.call("/api/task/send-task/workflows.delete", {"args": [instance_id]})
    assert reply["task-id"]
    record = wait_for_status(records, instance_id, [Status.DELETED], timeout_s=45)
    assert record.status is Status.DELETED
    assert record.get("guest_shutdown") and record.get("guest_user_revoked")

    # Flower shows the request and the delete chain's steps, the instance id in their arguments
    # (remove_instance records DELETED before it returns: its own success comes just after).
    def delete_shown() -> dict[str, str]:
        tasks = flower.call("/api/tasks?limit=1000")
        shown = {t["name"]: t["state"] for t in tasks.values() if instance_id in str(t.get("args"))
                 and t["name"] in ("taskmanager.shutdown_guest", "taskmanager.remove_instance")}
        shown["request"] = tasks.get(reply["task-id"], {}).get("state", "")
        done = len(shown) == 3 and all(state in ("SUCCESS", "FAILURE") for state in shown.values())
        return shown if done else {}

    shown = wait_until(delete_shown, 20, message="the delete's tasks finished in flower")
    assert shown == {"taskmanager.shutdown_guest": "SUCCESS", "taskmanager.remove_instance": "SUCCESS",
                     "request": "SUCCESS"}, shown


def test_ping_retries_of_a_late_guest_show_in_flower_with_their_reason(
        flower: FlowerClient, new_id: Callable[[str], str], records: Records) -> None:
    """The guest boots 2 s late: ping_guest retries, and Flower shows it RETRY with the reason."""
    instance_id = new_id("frt")
    reply = flower.call("/api/task/send-task/workflows.provision", {"args": [instance_id], "kwargs": {
        "datastore": "noop", "boot_delay_s": 2.0}})
    # The request's task id is its request id: the ping step's task id follows from it.
    ping_id = step_task_id(instance_id, reply["task-id"], "ping_guest")
    seen: list[dict[str, Any]] = []

    def ping_info() -> dict[str, Any]:
        try:
            info: dict[str, Any] = flower.call(f"/api/task/info/{ping_id}")
        except OSError:  # 404 until Flower has heard of the task
            return {}
        if not seen or (info["state"], info["retries"]) != (seen[-1]["state"], seen[-1]["retries"]):
            seen.append(info)
        return info if info["state"] == "SUCCESS" else {}

    # Watched as a user refreshing Flower would, every 0.1 s until ping_guest succeeds.
    info = wait_until(ping_info, 30, interval_s=0.1, message="ping_guest's success in flower")
    assert wait_for_status(records, instance_id, [Status.ACTIVE, Status.FAILED]).status is Status.ACTIVE
    retrying = [i for i in seen if i["state"] == "RETRY"]
    assert retrying, f"ping_guest was never seen in state RETRY: {[(i['state'], i['retries']) for i in seen]}"
    # RabbitMQ also says whether anything consumes the queue yet (Redis cannot tell).
    waiting = re.compile(rf"^StillWaiting\('instance {instance_id}: waiting for guest, ping (\d+) unanswered"
                         rf"( \(nobody consumes guest\.{instance_id} yet\))?, "
                         r"[\d.]+ s left, next ping in [\d.]+ s'\)$")
    for shown in retrying:
        match = waiting.match(shown["exception"])
        assert match, shown["exception"]
        # The RETRY row tells which ping went unanswered: the one before the retry Flower counts.
        assert int(match.group(1)) in (shown["retries"], shown["retries"] + 1), shown
    # One task, retried: SUCCESS in the end, its retries counted, the last retry's reason kept.
    assert info["name"] == "taskmanager.ping_guest" and instance_id in info["args"]
    assert info["retries"] >= 1 and info["result"] == repr(instance_id)
    last = waiting.match(info["exception"] or "")
    assert last and int(last.group(1)) == info["retries"], info


def test_a_prepared_password_appears_nowhere_flower_logs_or_redis_can_show(
        flower: FlowerClient, new_id: Callable[[str], str], records: Records, session_root: Path,
        taskmanager: Proc) -> None:
    instance_id = new_id("sec")
    reply = flower.call("/api/task/send-task/workflows.provision", {"args": [instance_id], "kwargs": {
        "datastore": "redis", "users": [{"name": "app", "password": PASSWORD}], "databases": ["app"]}})
    record = wait_for_status(records, instance_id, [Status.ACTIVE])
    assert record.status is Status.ACTIVE
    # Flower: wait until it has seen the provisioning's own events, then search everything it serves.
    wait_until(lambda: reply["task-id"] in flower.call("/api/tasks?limit=1000"), 20, message="flower saw it")
    shown = flower.raw("/api/tasks?limit=1000") + flower.raw(f"/api/task/info/{reply['task-id']}")
    assert "********" in shown, "the password field is there, masked"
    assert PASSWORD not in shown
    # Every key and value in Redis (records, results, queues, secrets store): no password.
    client = redis_client()
    for key in client.scan_iter(count=1000):
        assert PASSWORD not in f"{key} {dump(client, key)}", key
    # Logs: the taskmanager's, the guest's, Flower's.
    logs = [taskmanager.log_path, session_root / "logs" / "flower.log", *guests_root().glob("*/agent.log")]
    for log in logs:
        assert PASSWORD not in log.read_text(errors="replace"), log
    assert os.path.exists(logs[0])


def test_no_event_of_a_provisioning_carries_its_password(new_id: Callable[[str], str], records: Records) -> None:
    """Every event on the wire (task-sent included), not only what Flower ends up showing."""
    import threading

    from tasks import app

    seen: list[str] = []
    ready = threading.Event()
    stop = threading.Event()

    def listen() -> None:
        with app.connection_for_read() as conn:
            receiver = app.events.Receiver(conn, handlers={"*": lambda event: seen.append(json.dumps(event))})
            ready.set()
            while not stop.is_set():
                try:
                    receiver.capture(limit=None, timeout=0.5, wakeup=False)
                except TimeoutError:
                    continue
                except OSError:
                    continue

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    assert ready.wait(10)
    wait_until(lambda: seen, 10, message="the receiver hears the taskmanager's heartbeats")
    instance_id = new_id("evt")
    provision_chain(instance_id, datastore="redis", users=[{"name": "app", "password": PASSWORD}],
                    databases=["app"]).apply_async().get(timeout=60)
    wait_until(lambda: any(instance_id in e and "task-succeeded" in e and "verify" in e for e in seen), 20,
               message="the chain's events received")
    stop.set()
    thread.join(5)
    sent = [e for e in seen if '"task-sent"' in e and "create_queue" in e]
    assert sent and "********" in sent[0], "the create_queue task-sent event was seen, masked"
    assert not [e for e in seen if PASSWORD in e]


def test_flower_requires_basic_auth_by_default_and_serves_metrics_without(tmp_path: Path) -> None:
    """Without FLOWER_BASIC_AUTH, Flower still asks for a password (flowerconfig.py); /metrics
    and /healthcheck are Flower's own and open, as docs/isolation.md warns."""
    import urllib.error

    port = free_port()
    env = project_env(BERTH_HOME=str(tmp_path))
    env.pop("FLOWER_BASIC_AUTH", None)
    proc = Proc(celery("-A", "tasks", "flower", "--address=127.0.0.1", f"--port={port}"),
                tmp_path / "flower.log", env=env)
    base = f"http://127.0.0.1:{port}"

    def status(path: str, auth: str | None = None) -> int:
        headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(base + path, headers=headers), timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    try:
        wait_until(lambda: _answers(base), 60, interval_s=0.2, message="flower answering")
        auth_file = tmp_path / "flower.auth"
        assert auth_file.stat().st_mode & 0o077 == 0
        auth = auth_file.read_text().strip()
        assert auth.startswith("admin:") and len(auth) > len("admin:") + 10
        assert status("/api/workers") == 401
        assert status("/api/workers", "admin:wrong") == 401
        assert status("/api/workers", auth) == 200
        assert status("/", auth) == 200
        assert status("/metrics") == 200, "Flower serves /metrics without auth"
        assert status("/healthcheck") == 200
    finally:
        proc.stop()


def _answers(base: str) -> bool:
    try:
        urllib.request.urlopen(base + "/healthcheck", timeout=2).close()
        return True
    except OSError:
        return False
