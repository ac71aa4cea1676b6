"""The pure pieces on their own: the reconciler's next step, a guest's message authentication,
and the record's compare-and-set transitions (against a real, private Redis)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from berth.keys import SIGNATURE_HEADER, guest_key
from berth.records import InstanceRecord, Records, Status
from devtools.broker import EmbeddedRedis
from guest import authn
from tasks.reconcile import next_step
from tasks.taskmanager import validated


def record(status: str, **fields: Any) -> InstanceRecord:
    return InstanceRecord({"instance_id": "u-1", "status": status, **fields})


@pytest.mark.parametrize(("status", "fields", "step"), [
    ("NEW", {}, "create_queue"),
    ("BUILD", {}, "create_queue"),
    ("BUILD", {"booted_at": 1.0}, "ping_guest"),
    ("BUILD", {"booted_at": 1.0, "guest_ready_at": 2.0}, "send_prepare"),
    ("BUILD", {"booted_at": 1.0, "guest_ready_at": 2.0, "prepare_sent_at": 3.0}, "verify"),
    ("DELETING", {}, "shutdown_guest"),
    ("DELETING", {"guest_shutdown": "done"}, "remove_instance"),
    ("ACTIVE", {}, None), ("FAILED", {}, None), ("DELETED", {}, None), ("UNKNOWN", {}, None),
])
def test_the_next_step_of_a_chain_follows_from_the_record(status: str, fields: dict[str, Any],
                                                            step: str | None) -> None:
    assert next_step(record(status, **fields)) == step


# --- a guest's message authentication ----------------------------------------------------------------

def signed(task: str = "guest.ping", task_id: str = "u-1.guest.ping0.abc", instance_id: str = "u-1",
           expires_in_s: float = 60.0, **kwargs: Any) -> tuple[dict[str, Any], list[Any]]:
    """A message as the taskmanager sends it: headers with its signature, and the body."""
    expires = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=expires_in_s)).isoformat()
    headers: dict[str, Any] = {"task": task, "id": task_id, "expires": expires}
    body: list[Any] = [[], {"instance_id": instance_id, **kwargs}, {}]
    headers[SIGNATURE_HEADER] = guest_key("u-1", "req").sign(instance_id="u-1", headers=headers, body=body)
    return headers, body


def refusal(headers: dict[str, Any], body: Any, spent: authn.SpentIds, now: float | None = None) -> str | None:
    found = authn.check(headers, body, instance_id="u-1", key=guest_key("u-1", "req"), spent=spent, now=now)
    return None if found is None else found.reason


def test_a_guest_accepts_a_signed_new_message_and_refuses_every_other_kind(tmp_path: Path) -> None:
    spent = authn.SpentIds(tmp_path)
    headers, body = signed()
    assert refusal(headers, body, spent) is None
    assert refusal({**headers, "id": "u-10.guest.ping0.abc"}, body, spent) == authn.RETARGETED
    assert refusal(*signed(instance_id="u-2"), spent) == authn.RETARGETED
    assert refusal({k: v for k, v in headers.items() if k != SIGNATURE_HEADER}, body, spent) == authn.UNSIGNED
    assert refusal({**headers, "task": "guest.shutdown"}, body, spent) == authn.TAMPERED
    assert refusal(headers, [[], {"instance_id": "u-1", "extra": 1}, {}], spent) == authn.TAMPERED
    assert refusal(headers, body, spent, now=time.time() + 3600) == authn.EXPIRED
    spent.spend(headers["id"], time.time() + 60)
    assert refusal(headers, body, spent) == authn.REPLAYED
    assert refusal({**headers, "redelivered": True}, body, spent) == authn.ALREADY_RAN


# --- record transitions ------------------------------------------------------------------------------

@pytest.fixture
def records(tmp_path: Path) -> Iterator[Records]:
    server = EmbeddedRedis(tmp_path / "redis").start()
    yield Records(redis.Redis.from_url(server.url, decode_responses=True))
    server.stop()


def test_a_transition_happens_only_from_the_statuses_it_names(records: Records) -> None:
    assert records.create(validated("u-1", datastore="noop"), request_id="req")
    assert not records.create(validated("u-1", datastore="noop"), request_id="req"), "the same request: no-op"
    assert records.transition("u-1", Status.BUILD, [Status.NEW], "create_queue")
    assert records.transition("u-1", Status.FAILED, [Status.NEW, Status.BUILD], "ping_guest",
                              reason="GUEST_UNREACHABLE")
    # A late verify finds FAILED and cannot make it ACTIVE.
    assert not records.transition("u-1", Status.ACTIVE, [Status.BUILD], "verify")
    found = records.get("u-1")
    assert found is not None and found.status is Status.FAILED and found.reason == "GUEST_UNREACHABLE"
    assert not records.transition("u-2", Status.BUILD, [Status.NEW], "create_queue"), "no record: refused"


def test_set_once_keeps_the_first_value_whatever_runs_again(records: Records) -> None:
    assert records.create(validated("u-3", datastore="noop"), request_id="req")
    assert records.set_once("u-3", "ping_deadline_at", 100.0) == 100.0
    assert records.set_once("u-3", "ping_deadline_at", 200.0) == 100.0


# --- what a guest agent loads ------------------------------------------------------------------

def test_a_guest_agent_loads_no_certificate_or_encryption_code_until_it_needs_it() -> None:
    """`cryptography`'s x509 and Fernet cost a process 6-8 MiB each: the guest agent (its app, its
    tasks and its consumer, as its worker loads them) only verifies the broker, so neither loads."""
    import json
    import subprocess
    import sys

    from berth.paths import PROJECT_DIR
    from tests.helpers import project_env

    code = ("import json, sys\n"
            "from guest import app\n"
            "app.loader.import_default_modules()\n"
            "import guest.consumer, guest.launch\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('cryptography.'))))\n")
    env = project_env(CELERY_BROKER_URL="redis://127.0.0.1:1/0", CELERY_RESULT_BACKEND="redis://127.0.0.1:1/0")
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_DIR, env=env, capture_output=True, text=True,
                          timeout=60, check=True)
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    heavy = [m for m in loaded if m.startswith(("cryptography.x509", "cryptography.fernet", "cryptography.hazmat"))]
    assert not heavy, f"the guest agent imports {heavy}"


@pytest.mark.parametrize(("name", "ends"), [
    ("10.77.0.5:51234 -> 10.77.0.1:5671", (("10.77.0.5", 51234), ("10.77.0.1", 5671))),
    ("[::1]:40000 -> [::1]:5672", (("::1", 40000), ("::1", 5672))),
    ("::1:40000 -> ::1:5672", (("::1", 40000), ("::1", 5672))),
    ("no arrow here", (None, None)),
    ("host:notaport -> 127.0.0.1:5672", (None, ("127.0.0.1", 5672))),
])
def test_a_tracked_rabbitmq_connection_name_gives_its_two_ends(name: str, ends: tuple[Any, Any]) -> None:
    from berth.brokers.rabbitmq.admin import connection_ends

    assert connection_ends(name) == ends


def test_a_nacked_publish_is_told_apart_from_a_broker_that_is_down() -> None:
    from amqp.exceptions import MessageNacked
    from kombu.exceptions import OperationalError

    from workflows import nacked

    def raised(exc: BaseException, cause: BaseException | None) -> BaseException:
        try:
            try:
                raise cause if cause is not None else exc
            except BaseException as inner:
                if cause is None:
                    raise
                raise exc from inner
        except BaseException as caught:  # noqa: BLE001 - the exception as code sees it
            return caught

    assert nacked(raised(MessageNacked(), None))
    assert nacked(raised(OperationalError(), MessageNacked()))  # what Celery raises after its own retries
    assert not nacked(raised(OperationalError("[Errno 111] Connection refused"), ConnectionRefusedError(111, "x")))
    assert not nacked(raised(ValueError("bad"), None))
