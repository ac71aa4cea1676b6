"""Guests are isolated: each holds a broker user of its own, and believes only what it can verify.

Against the session's real Redis: with guest A's credentials, everything of guest B, of the
taskmanager and of the instance records is refused; forged, tampered, retargeted, expired and
replayed messages are refused by the guest, which goes on serving; a deleted instance's
credentials open nothing.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import functools
import json
import os
import signal
from collections.abc import Callable
from typing import Any

import pytest
import redis

from berth.brokers.redis import queues
from berth.ids import (
    RECORD_INDEX_KEY,
    binding_keys,
    deadletter_key,
    guest_queue,
    ping_task_id,
    queue_lists,
    record_key,
    result_key,
    secrets_key,
    step_task_id,
    unacked_keys,
)
from berth.keys import SIGNATURE_HEADER, GuestKey
from berth.records import Records, Status
from guest import deadletters
from tasks import app
from tasks.runtime import redis_client, result_client, store
from tests.brokers import on_rabbitmq
from tests.helpers import (
    Envelope,
    Proc,
    body_of,
    guest_identity,
    pop_envelope,
    push_envelope,
    send_to_guest,
    wait_for_status,
    wait_until,
    with_body,
)
from workflows import provision_chain

pytestmark = [pytest.mark.broker, pytest.mark.usefixtures("taskmanager")]


def as_guest(instance_id: str) -> redis.Redis:
    """A client on the store (the broker itself on Redis; beside RabbitMQ, the result backend) with
    the guest's own credentials, as its agent connects to store answers, heartbeats and dead letters.
    On RabbitMQ its broker user is tested in tests/test_rabbitmq.py."""
    env, _ = guest_identity(instance_id)
    return redis.Redis.from_url(env["CELERY_RESULT_BACKEND"], decode_responses=True, socket_connect_timeout=2)


def refused(call: Callable[[], Any]) -> bool:
    try:
        call()
    except redis.exceptions.NoPermissionError:
        return True
    return False


@pytest.fixture(scope="module")
def two_guests() -> tuple[str, str]:
    """Two ACTIVE instances with local guests, each holding a result and a dead letter."""
    from tests.helpers import unique_id

    ids = (unique_id("iso-a"), unique_id("iso-b"))
    for instance_id in ids:
        provision_chain(instance_id, datastore="noop", users=[{"name": "app", "password": "Isolated-pw-1"}]
                        ).apply_async().get(timeout=60)
    return ids


def test_a_guests_credentials_open_its_own_keys_and_nothing_else(two_guests: tuple[str, str],
                                                                 records: Records) -> None:
    a, b = two_guests
    record_b, record_a = records.get(b), records.get(a)
    assert record_a is not None and record_b is not None
    guest_a = as_guest(a)
    # The ping B answered: under load its guest may start after the first pings expired.
    answered = [result_key(ping_task_id(b, record_b["request_id"], n)) for n in range(record_b["ping_attempts"] + 1)]
    b_result = next((key for key in answered if redis_client().exists(key)), "")
    assert b_result, "B answered a ping: there is a result to steal"
    # What A's agent needs works (a control: the refusals below are about the keys, not the login).
    if not on_rabbitmq():  # on RabbitMQ the queue is not in Redis: its user has no queue keys at all
        assert guest_a.llen(guest_queue(a)) == 0
        guest_a.hlen(unacked_keys(a)["unacked_key"])
    own_result = result_key(f"{a}.guest.probe")
    guest_a.set(own_result, "{}")
    guest_a.delete(own_result)
    guest_a.lpush(deadletter_key(a), "{}")
    guest_a.delete(deadletter_key(a))

    attempts: dict[str, Callable[[], Any]] = {
        # B's queue, every priority list of it: read, pop, push
        **{f"LRANGE {name!r}": functools.partial(guest_a.lrange, name, 0, -1) for name in queue_lists(b)},
        "RPOP B's queue": lambda: guest_a.rpop(guest_queue(b)),
        "BRPOP B's queue": lambda: guest_a.brpop([guest_queue(b)], timeout=0.1),
        "LPUSH B's queue": lambda: guest_a.lpush(guest_queue(b), "forged"),
        "LPUSH B's priority list": lambda: guest_a.lpush(queue_lists(b)[1], "forged"),
        # the taskmanager's queue
        "LLEN taskmanager": lambda: guest_a.llen("taskmanager"),
        "RPOP taskmanager": lambda: guest_a.rpop("taskmanager"),
        "LPUSH taskmanager": lambda: guest_a.lpush("taskmanager", "forged"),
        # B's results, and the taskmanager's results of A's own chain
        "GET B's result": lambda: guest_a.get(b_result),
        "SET B's result": lambda: guest_a.set(b_result, "forged"),
        "SET A's verify step result": lambda: guest_a.set(
            result_key(step_task_id(a, record_a["request_id"], "verify")), "forged"),
        "PUBLISH on B's result channel": lambda: guest_a.publish(b_result, "forged"),
        # instance records (B's and A's own), the index, secrets, B's ack keys and dead letters
        "HGETALL B's record": lambda: guest_a.hgetall(record_key(b)),
        "HSET A's own record": lambda: guest_a.hset(record_key(a), "status", "ACTIVE"),
        "ZRANGE the record index": lambda: guest_a.zrange(RECORD_INDEX_KEY, 0, -1),
        "HGETALL B's secrets": lambda: guest_a.hgetall(secrets_key(b)),
        "HGETALL B's unacked": lambda: guest_a.hgetall(unacked_keys(b)["unacked_key"]),
        "HGETALL the shared unacked hash": lambda: guest_a.hgetall("unacked"),
        "LPUSH B's dead letters": lambda: guest_a.lpush(deadletter_key(b), "{}"),
        # bindings (a binding added here would route the taskmanager's publishes elsewhere)
        "SADD A's binding": lambda: guest_a.sadd(binding_keys(a)[0], f"guest.{a}\x06\x16\x06\x16guest.{b}"),
        "SMEMBERS B's binding": lambda: guest_a.smembers(binding_keys(b)[0]),
        # listing or administering anything
        "KEYS": lambda: guest_a.keys("*"),
        "SCAN": lambda: guest_a.scan(0),
        "ACL LIST": lambda: guest_a.execute_command("ACL", "LIST"),
        "CONFIG GET": lambda: guest_a.config_get("*"),
        "FLUSHALL": lambda: guest_a.flushall(),
        "events": lambda: guest_a.publish("/0.celeryev/task.succeeded", "forged"),
    }
    allowed = [name for name, call in attempts.items() if not refused(call)]
    assert allowed == [], f"guest {a}'s credentials may do these: {allowed}"
    assert redis_client().get(b_result) is not None and redis_client().llen(guest_queue(b)) == 0, "nothing changed"
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(store().replace("//:", "//nobody:", 1), socket_connect_timeout=2).ping()


def test_a_local_guest_gets_its_own_credentials_and_none_of_the_control_planes(two_guests: tuple[str, str]) -> None:
    from tasks.drivers import LocalDriver

    a, _ = two_guests
    pid = LocalDriver().pid(a)
    assert pid is not None
    raw = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    env = dict(item.decode().split("=", 1) for item in raw if b"=" in item)
    own, _ = guest_identity(a)
    assert {k: env.get(k) for k in own} == own
    assert not any(app.conf.broker_url.encode() in item for item in raw), "no admin broker URL"
    assert not any(app.conf.result_backend.encode() in item for item in raw), "no admin result backend URL"
    assert "BERTH_MASTER_KEY" not in env and "FLOWER_BASIC_AUTH" not in env


def test_a_control_plane_with_another_master_key_is_refused() -> None:
    from berth.keys import b64
    from tests.helpers import project_env, workflows_cli

    out = workflows_cli("list", env=project_env(BERTH_MASTER_KEY=b64(os.urandom(32))))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "is not the one this broker's instances were made with" in out.stderr
    assert workflows_cli("list").returncode == 0


def test_the_broker_lets_no_one_in_without_credentials() -> None:
    kwargs = redis_client().connection_pool.connection_kwargs
    anonymous = redis.Redis(host=kwargs["host"], port=kwargs["port"], socket_connect_timeout=2)
    with pytest.raises((redis.exceptions.AuthenticationError, redis.exceptions.ResponseError), match="(?i)auth"):
        anonymous.get(RECORD_INDEX_KEY)


def test_guest_env_prints_the_guests_own_user_and_key(two_guests: tuple[str, str]) -> None:
    from tests.helpers import workflows_cli

    a, _ = two_guests
    out = workflows_cli("guest-env", a)
    assert out.returncode == 0, out.stderr
    env, key = guest_identity(a)
    for name, value in env.items():
        assert f"export {name}=" in out.stdout and value in out.stdout
    assert f"{'amqp' if on_rabbitmq() else 'redis'}://guest.{a}:" in env["CELERY_BROKER_URL"]
    assert f"redis://guest.{a}:" in env["CELERY_RESULT_BACKEND"]
    assert key.text() == env["BERTH_GUEST_KEY"]
    assert f"--instance-id {a}" in out.stdout
    assert workflows_cli("guest-env", "Not_An_Id").returncode == 2
    assert workflows_cli("guest-env", "iso-nobody-here").returncode == 1


def test_delete_revokes_the_guests_user(new_id: Callable[[str], str], records: Records) -> None:
    from tests.helpers import workflows_cli

    instance_id = new_id("rev")
    provision_chain(instance_id, datastore="noop").apply_async().get(timeout=60)
    guest = as_guest(instance_id)
    url = guest_identity(instance_id)[0]["CELERY_RESULT_BACKEND"]
    own_dead_letters = deadletter_key(instance_id)
    assert guest.llen(own_dead_letters) == 0
    out = workflows_cli("delete", instance_id, "--wait")
    assert out.returncode == 0, out.stderr
    with pytest.raises((redis.exceptions.AuthenticationError, redis.exceptions.ConnectionError)):
        guest.llen(own_dead_letters)  # the connection it had is gone
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()  # and its password opens nothing
    record = records.get(instance_id)
    assert record is not None and record.status is Status.DELETED and record["guest_user_revoked"] == 1
    assert workflows_cli("guest-env", instance_id).returncode == 1


# --- Messages: only what the taskmanager signed for this guest, once, in time --------------------


def push(instance_id: str, message: Envelope) -> None:
    push_envelope(redis_client(), instance_id, message)


@pytest.mark.redis  # pushes envelopes onto Redis lists; RabbitMQ's: tests/test_rabbitmq.py
def test_forged_tampered_retargeted_expired_and_replayed_messages_are_refused_and_the_guest_goes_on(
        new_id: Callable[[str], str], start_guest: Callable[[str], Proc]) -> None:
    mine, other = new_id("auth"), new_id("authx")
    for instance_id in (mine, other):
        queues.declare(redis_client(), instance_id)
    results = result_client()
    # Genuine messages, signed as the taskmanager signs them; taken off the list to be altered.
    send_to_guest(mine, "guest.ping", "genuine")
    genuine = pop_envelope(redis_client(), mine)
    send_to_guest(other, "guest.ping", "for-other")
    for_other = pop_envelope(redis_client(), other)
    send_to_guest(mine, "guest.ping", "late", expires=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
    expired = pop_envelope(redis_client(), mine)

    def variant(name: str, change: Callable[[Envelope], None]) -> Envelope:
        message = copy.deepcopy(genuine)
        message["headers"].update(id=f"{mine}.guest.{name}", root_id=f"{mine}.guest.{name}")
        message["properties"]["correlation_id"] = f"{mine}.guest.{name}"
        change(message)
        return message

    def resign(message: Envelope, key: GuestKey) -> None:
        headers = message["headers"]
        headers[SIGNATURE_HEADER] = key.sign(instance_id=mine, headers=headers, body=body_of(message))

    def other_kwargs(message: Envelope) -> None:
        body = body_of(message)
        body[1]["extra"] = "injected"
        message["body"] = with_body(message, body)["body"]

    def protocol_1(message: Envelope) -> None:
        message["headers"].pop("task")
        message["body"] = with_body(message, {"task": "guest.ping", "id": f"{mine}.guest.proto1", "args": [],
                                              "kwargs": {"instance_id": mine}})["body"]

    cases = {
        # no signature at all (anyone with push access to the list, Celery's own publish)
        f"{mine}.guest.unsigned": (variant("unsigned", lambda m: m["headers"].pop(SIGNATURE_HEADER)), "unsigned"),
        # signed, but not with this guest's key (a forger's, or another guest's)
        f"{mine}.guest.forged": (variant("forged", lambda m: resign(m, GuestKey(os.urandom(32)))), "tampered"),
        # a genuine signature over other content: the arguments, or only the task name header
        f"{mine}.guest.tampered": (variant("tampered", other_kwargs), "tampered"),
        f"{mine}.guest.renamed": (variant("renamed", lambda m: m["headers"].update(task="guest.shutdown")),
                                  "tampered"),
        # or a header that changes how it runs: no result stored, run later
        f"{mine}.guest.noresult": (variant("noresult", lambda m: m["headers"].update(ignore_result=True)),
                                   "tampered"),
        f"{mine}.guest.delayed": (variant("delayed", lambda m: m["headers"].update(
            eta=dt.datetime.now(dt.UTC).isoformat())), "tampered"),
        # signed the same, but its id changed: the signature covers the id
        f"{mine}.guest.reid": (variant("reid", lambda m: None), "tampered"),
        # the task named in the body, no task header (Celery's protocol 1): Celery would run it
        f"{mine}.guest.proto1": (variant("proto1", protocol_1), "unsigned"),
        # genuine, signed for another instance, pushed onto this guest's queue
        for_other["headers"]["id"]: (for_other, "retargeted"),
    }
    for message, _ in cases.values():
        push(mine, message)
    push(mine, expired)
    push(mine, genuine)
    push(mine, copy.deepcopy(genuine))  # the same message again: a replay

    guest = start_guest(mine)
    answer = send_to_guest(mine, "guest.ping", "after").get(timeout=30)
    assert answer["instance_id"] == mine, "the guest still serves after every refusal"

    entries = {entry["id"]: entry for entry in deadletters.read(redis_client(), mine)}
    expected = {task_id: reason for task_id, (_, reason) in cases.items()}
    expected[genuine["headers"]["id"]] = "replayed"
    assert {task_id: entry["reason"] for task_id, entry in entries.items()} == expected
    for task_id, entry in entries.items():
        assert f"({entry['reason']}: " in guest.log(), "the guest logs why"
        if entry["reason"] != "replayed":
            assert not results.exists(result_key(task_id)), f"{task_id} ran"
    assert results.exists(result_key(genuine["headers"]["id"])), "the genuine message ran, once"
    assert f"refused a message on guest.{mine} (expired" in guest.log()
    assert not results.exists(result_key(expired["headers"]["id"]))
    assert guest.log().count(f"Task guest.ping[{genuine['headers']['id']}] received") == 1
    assert guest.alive()


# --- No password at rest: not in any write the broker ever made, not in any log ----------------


def encodings(secret: str) -> list[bytes]:
    """The secret as it would appear in the AOF: plain, or inside a base64 message body.

    kombu base64-encodes a message body whole, so a password inside it shows as one of three
    substrings, one per alignment.
    """
    raw = secret.encode()
    found = [raw]
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw)
        head = (offset * 4 + 2) // 3  # characters that also carry the padding bytes
        found.append(encoded[head + 1:-4])
    return found


def test_no_password_is_written_anywhere_in_plaintext(stack: Any) -> None:
    """Provisioned through the command line and with `celery call`: the broker's AOF (every write
    it ever made: queues, unacked hashes, secrets, results, records), its ACL file, every log."""
    import subprocess
    import uuid

    from berth.paths import PROJECT_DIR
    from tests.helpers import celery

    stack.start_taskmanager()
    passwords = {"sec-cli": f"Cli-{uuid.uuid4().hex}", "sec-call": f"Call-{uuid.uuid4().hex}"}
    out = stack.cli("provision", "sec-cli", "--datastore", "redis", "--user", f"app:{passwords['sec-cli']}",
                    "--database", "app", "--wait")
    assert out.returncode == 0, out.stdout + out.stderr
    request = {"datastore": "redis", "users": [{"name": "app", "password": passwords["sec-call"]}],
               "databases": ["app"]}
    called = subprocess.run(celery("-A", "tasks", "call", "workflows.provision", "--args", '["sec-call"]',
                                   "--kwargs", json.dumps(request)),
                            env=stack.env, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=60)
    assert called.returncode == 0, called.stderr
    records = Records(stack.client())
    for instance_id, password in passwords.items():
        record = wait_for_status(records, instance_id, [Status.ACTIVE, Status.FAILED])
        assert record.status is Status.ACTIVE, record.fields
        connection = record["connection"]
        # The password did travel, sealed, all the way to the datastore.
        assert redis.Redis(port=connection["port"], username="app", password=password).ping()

    # Every file the broker and the store wrote: the AOF, the ACL file; on RabbitMQ, the node's
    # message stores and queue indexes too.
    written = b"".join(path.read_bytes() for root in (stack.root / "redis", stack.root / "rabbitmq")
                       for path in root.rglob("*") if path.is_file())
    assert b"berth-sealed:v1:" in written, "the control: sealed values are there"
    logs = [*stack.root.glob("logs/*.log"), *stack.home.glob("guests/*/agent.log"),
            *stack.home.glob("guests/*/*/*.log")]
    assert len(logs) >= 3
    for instance_id, password in passwords.items():
        for form in encodings(password):
            assert form not in written, f"{instance_id}'s password is in the broker's files"
            for log in logs:
                assert form not in log.read_bytes(), f"{instance_id}'s password is in {log}"


@pytest.mark.redis  # the ACL file; RabbitMQ keeps its users (the broker drill restarts a node)
def test_a_broker_that_lost_its_users_gets_them_back_and_guests_reconnect(stack: Any) -> None:
    """Guests' users are not written to the broker's ACL file (a rewrite of the whole file per
    user is what made 1,000 provisionings slow): a restarted broker knows its admin user only,
    each taskmanager node mints the live instances' users again, and their guests carry on."""
    from devtools.broker import ACL_FILE

    tm = stack.start_taskmanager()
    acl_file = stack.root / "redis" / ACL_FILE
    # A deleted instance's user is gone for good: its revoke saves the file, with the live
    # guests' users as they are then, and never the deleted one.
    failed = stack.cli("provision", "gone-1", "--datastore", "noop", "--boot", "none", "--ping-deadline", "1",
                       "--wait")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    deleted = stack.cli("delete", "gone-1", "--wait")
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    assert "guest.gone-1" not in acl_file.read_text()
    out = stack.cli("provision", "lost-1", "--datastore", "noop", "--wait")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "guest.lost-1" not in acl_file.read_text() and "user default" in acl_file.read_text()
    # The taskmanager frozen meanwhile, so that nothing mints the user before we look.
    tm.signal(signal.SIGSTOP)
    try:
        stack.broker.kill()
        stack.broker.start()
        client = stack.client()
        assert "guest.lost-1" not in client.execute_command("ACL", "USERS")
    finally:
        tm.signal(signal.SIGCONT)
    wait_until(lambda: "guest.lost-1" in client.execute_command("ACL", "USERS"), 30, message="user minted again")
    assert "guest.gone-1" not in client.execute_command("ACL", "USERS")
    pong = stack.cli("ping", "lost-1", "--timeout", "30")
    assert pong.returncode == 0, pong.stdout + pong.stderr
    assert json.loads(pong.stdout)["instance_id"] == "lost-1"
    assert any("minted again: lost-1" in tm.log() for tm in stack.taskmanagers)


def test_a_result_backend_of_its_own_that_restarts_gets_the_guests_users_back(stack: Any) -> None:
    """With CELERY_RESULT_BACKEND on another Redis, that server holds the guests' users too (a
    guest stores its answers there): after it restarts, each taskmanager node mints them again."""
    from devtools.broker import EmbeddedRedis

    results = EmbeddedRedis(stack.root / "results").start()
    try:
        stack.env["CELERY_RESULT_BACKEND"] = results.url
        tm = stack.start_taskmanager()
        out = stack.cli("provision", "lost-2", "--datastore", "noop", "--wait")
        assert out.returncode == 0, out.stdout + out.stderr
        client = redis.Redis.from_url(results.url, decode_responses=True)
        assert "guest.lost-2" in client.execute_command("ACL", "USERS")
        tm.signal(signal.SIGSTOP)  # so that nothing mints the user before we look
        try:
            results.kill()
            results.start()
            assert "guest.lost-2" not in client.execute_command("ACL", "USERS")
        finally:
            tm.signal(signal.SIGCONT)
        wait_until(lambda: "guest.lost-2" in client.execute_command("ACL", "USERS"), 30,
                   message="user minted again on the result backend")
        pong = stack.cli("ping", "lost-2", "--timeout", "30")
        assert pong.returncode == 0, pong.stdout + pong.stderr
    finally:
        results.stop()
