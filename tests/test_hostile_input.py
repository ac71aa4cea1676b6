"""What a guest writes is hostile bytes: each way a compromised guest once hurt the control plane, tried.

A hostile guest here holds one guest's credentials and key and nothing else (tests/hostile.py), on
a real broker, against real taskmanager code: garbage heartbeats, garbage on its answer channels,
keys its delete once could not remove, control characters in its answers, guest-API answers of
the wrong shape, values larger than a broker should hold. The parsers are also fuzzed with
hypothesis: whatever the bytes, only the project's own error comes out.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from berth import untrusted
from berth.brokers.redis import queues
from berth.errors import GuestError, Malformed
from berth.guestapi import check_answer, check_connection
from berth.ids import deadletter_key, heartbeat_key, queue_lists, record_key, unacked_keys
from berth.keys import guest_key
from berth.paths import PROJECT_DIR
from berth.records import Records, Status
from berth.redis_server import limit_warnings, redis_server_binary
from devtools.broker import EmbeddedRedis
from guest import deadletters
from tasks import answers, guestapi, heartbeats, waiting
from tests.helpers import (
    Proc,
    guest_identity,
    project_env,
    send_to_guest,
    unique_id,
    wait_for_status,
    wait_until,
    workflows_cli,
)
from tests.hostile import HostileGuest, keys_naming, pong, prepared, printable, result_document
from workflows import provision_chain

ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                    max_size=4), max_leaves=15)
NASTY_PIECES = ["\x1b", "[2J", "\n", "\r", "\x07", "\u202e", "\x00", "\x9b", "a", "é", "\ud800"]
NASTY_TEXT = st.lists(st.sampled_from(NASTY_PIECES), max_size=30).map("".join)



@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis").start()
    yield server
    server.stop()


# --- heartbeats -----------------------------------------------------------------------------------


def _serving(client: redis.Redis, instance_id: str, request_id: str, heard_at: float) -> None:
    client.hset(record_key(instance_id), mapping={"instance_id": instance_id, "status": "ACTIVE",
                                                  "request_id": request_id, "active_at": heard_at})
    heartbeats.watch(client, instance_id, heard_at)


def _report(instance_id: str, request_id: str, seq: int) -> bytes:
    report = {"instance_id": instance_id, "seq": seq, "sent_at": time.time(), "version": "t",
              "datastore": "noop", "datastore_status": "running"}
    return json.dumps({"report": report, "mac": guest_key(instance_id, request_id).report_mac(report)}).encode()


def test_one_guests_garbage_heartbeats_never_stop_the_round_for_the_others(private_redis: EmbeddedRedis,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    client = redis.Redis.from_url(private_redis.url)
    live, silent, evil = unique_id("hb-live"), unique_id("hb-silent"), unique_id("hb-evil")
    now = float(client.time()[0])
    _serving(client, live, "r-live", now)
    _serving(client, silent, "r-silent", now - 100)
    _serving(client, evil, "r-evil", now)
    unsigned = {"report": {"instance_id": evil, "seq": 1, "datastore_status": "running"}, "mac": "\ud800"}
    garbage = [b"\xff", b"[" * 3000, b"x" * 100_000, b'{"report": "no"}', b'{"report": {"seq": 1e999}}',
               _report(live, "r-live", 7), json.dumps(unsigned).encode()]
    client.rpush(heartbeat_key(evil), *garbage)
    client.rpush(heartbeat_key(live), _report(live, "r-live", 5))
    monitor = heartbeats.Monitor(client, expiry_s=30)
    with caplog.at_level(logging.WARNING, logger="berth.heartbeats"):
        counts = monitor.check()
        assert counts["refused"] == len(garbage)
        records = Records(redis.Redis.from_url(private_redis.url, decode_responses=True))
        assert records.get(live).get("heartbeats") == 1  # type: ignore[union-attr]
        assert records.get(silent).status is Status.UNKNOWN  # type: ignore[union-attr]
        assert records.get(evil).status is Status.ACTIVE  # type: ignore[union-attr]
        # Its list made a hash: still only its problem, on the next round too.
        client.delete(heartbeat_key(evil))
        client.hset(heartbeat_key(evil), "a", "b")
        client.rpush(heartbeat_key(live), _report(live, "r-live", 6))
        assert monitor.check()["refused"] == 1
        assert records.get(live).get("heartbeats") == 2  # type: ignore[union-attr]
    complaints = [r.getMessage() for r in caplog.records if evil in r.getMessage()]
    assert len(complaints) == 1, complaints  # one line a minute, not one per report
    assert "further ones" in complaints[0] and printable(complaints[0])


def test_a_report_over_the_limit_is_never_sent_to_the_control_plane(private_redis: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(private_redis.url)
    key = heartbeat_key(unique_id("hb-big"))
    client.rpush(key, b"x" * 1_500_000, b"{}")
    [taken] = untrusted.take_lists(client, [key], -16, -1, untrusted.MAX_REPORT_BYTES, delete=True)
    assert taken == [1_500_000, b"{}"]  # the large one as its length only
    assert not client.exists(key)


# --- the prepare-answer listener --------------------------------------------------------------------


def test_the_prepare_answer_listener_outlives_anything_published_on_its_channels(
        private_redis: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[bytes] = []
    real = answers.on_answer

    def counting(channel: bytes | str, data: bytes | str) -> bool:
        seen.append(bytes(data) if isinstance(data, bytes) else data.encode())
        return real(channel, data)

    monkeypatch.setattr(answers, "on_answer", counting)
    worker = SimpleNamespace(app=SimpleNamespace(conf=SimpleNamespace(result_backend=private_redis.url)))
    step = answers.PrepareAnswers(worker)
    admin = redis.Redis.from_url(private_redis.url)
    with caplog.at_level(logging.WARNING):
        step.start(worker)
        try:
            wait_until(lambda: admin.pubsub_numpat() >= 1, 10, message="listener subscribed")
            channel = f"celery-task-meta-{unique_id('pa')}.guest.prepare.x".encode()
            published = [b"\xff\xfe", b"[" * 5000, b'{"status": "SUCCESS", "result": {"connection": 5}}',
                         b'{"status": "SUCCESS", "result": []}', b"x" * 1_500_000, result_document("SUCCESS", {})]
            for data in published:
                admin.publish(channel, data)
            admin.publish(b"celery-task-meta-\xff.guest.prepare.\xfe", b"{}")
            wait_until(lambda: len(seen) == len(published) + 1, 20, message="every publish seen")
            assert step.thread is not None and step.thread.is_alive()
        finally:
            step.stop(worker)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# --- delete ---------------------------------------------------------------------------------------



@pytest.mark.usefixtures("taskmanager")
def test_a_guest_can_neither_make_its_delete_fail_nor_leave_a_key_behind(new_id: Any, records: Records) -> None:
    from tasks import app

    instance_id = new_id("hd")
    provision_chain(instance_id, datastore="noop").apply_async().get(timeout=60)
    guest = HostileGuest(guest_identity(instance_id)[0])
    try:
        # What its user is refused: another database, a name past its exact priority lists.
        for refused in (lambda: guest.broker.execute_command("SELECT", 1),
                        lambda: guest.broker.set(f"guest.{instance_id}\x06\x16zz", "x"),
                        lambda: guest.broker.set(f"guest.{instance_id}\x06\x163x", "x")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                refused()
        # What it may write, under names that are not UTF-8 and with types nobody expects.
        guest.results.set(guest.result_key(b"\xff\xfe"), b"\xff")
        guest.results.set(guest.result_key("x" * 500), b"1")
        guest.broker.delete(deadletter_key(instance_id))
        guest.broker.hset(deadletter_key(instance_id), "a", "b")
        guest.broker.set(queue_lists(instance_id)[2], b"\xff")
        guest.broker.set(unacked_keys(instance_id)["unacked_mutex_key"], b"\xff")
        out = workflows_cli("delete", instance_id, "--wait", timeout_s=120)
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        guest.stop()
    assert records.get(instance_id).status is Status.DELETED  # type: ignore[union-attr]
    admin = redis.Redis.from_url(app.conf.broker_url)
    assert keys_naming(admin, instance_id) == []


@pytest.mark.usefixtures("taskmanager")
def test_a_guests_garbage_or_forgery_on_its_answer_channels_reaches_no_other_result(new_id: Any,
                                                                                   records: Records) -> None:
    """A process still subscribed to a guest's answer channel (a ``.get()`` on a guest message that
    timed out) reads what the guest publishes there: garbage must not raise out of another
    ``.get()``, and a result naming another task must not become that task's result."""
    from celery.exceptions import TimeoutError as CeleryTimeout

    hostile_id, victim_id = new_id("chan"), new_id("victim")
    provision_chain(hostile_id, datastore="noop", boot="none", ping_deadline_s=20).apply_async()
    wait_until(lambda: queues.exists(records.client, hostile_id), 30, message="queue created")
    guest = HostileGuest(guest_identity(hostile_id)[0])
    held = send_to_guest(hostile_id, "guest.ping", "held", expires_s=5)  # nobody consumes it
    with pytest.raises(CeleryTimeout):
        held.get(timeout=0.3)  # this process stays subscribed to the guest's channel
    victim = provision_chain(victim_id, datastore="noop").apply_async()
    channel = f"celery-task-meta-{held.id}"
    forged = json.dumps({"status": "SUCCESS", "task_id": victim.id, "result": "forged", "traceback": None,
                         "children": []}).encode()
    for payload in (b"\xff\xfe not json", b"[1, 2]", b"{}", forged, b'{"status": "SUCCESS", "task_id": 7}'):
        assert guest.results.publish(channel, payload) >= 1, "nobody listened: the drill proves nothing"
    result = victim.get(timeout=60)
    assert result != "forged" and result["status"] == "ACTIVE", result


# --- control characters ---------------------------------------------------------------------------

TERMINAL_TRICKS = "\x1b[2J\x1b]0;pwned\x07\r\n[INFO] instance db-1: BUILD -> ACTIVE\u202e"


@pytest.mark.usefixtures("taskmanager")
def test_a_guests_control_characters_reach_no_terminal_record_or_log(new_id: Any, records: Records,
                                                                     taskmanager: Proc, tmp_path: Path) -> None:
    instance_id = new_id("cc")
    log = tmp_path / "cli.out"
    with open(log, "w") as out:
        cli = subprocess.Popen([sys.executable, "-m", "workflows", "provision", instance_id, "--boot", "none",
                                "--ping-deadline", "60", "--wait"], cwd=PROJECT_DIR, env=project_env(),
                               stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: queues.exists(records.client, instance_id), 30, message="queue created")
        guest = HostileGuest(guest_identity(instance_id)[0])

        def answer(task: str, task_id: str) -> bytes:
            if task == "guest.ping":
                return pong(instance_id, version=TERMINAL_TRICKS)
            return result_document("FAILURE", {"exc_type": TERMINAL_TRICKS, "exc_message": [TERMINAL_TRICKS],
                                               "exc_module": "x"})

        guest.serve(answer)
        try:
            assert cli.wait(timeout=90) == 1
        finally:
            guest.stop()
    printed = log.read_text()
    assert "FAILED PREPARE_FAILED" in printed and "\\x1b[2J" in printed, printed
    assert printable(printed), printed
    record = records.get(instance_id)
    assert record is not None and record.status is Status.FAILED
    for field in ("error", "guest_version"):
        assert printable(record[field]) and "\n" not in record[field], record[field]
    shown = workflows_cli("show", instance_id)
    assert shown.returncode == 0 and printable(shown.stdout)
    lines = [line for line in taskmanager.log().splitlines() if instance_id in line]
    assert lines and all(printable(line) for line in lines), lines


# --- guest-API answers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_active(taskmanager: Proc) -> Iterator[tuple[str, dict[str, bytes]]]:
    """An ACTIVE instance whose 'guest' is a hostile one answering the guest API with ``reply['doc']``."""
    from tasks.runtime import records

    instance_id = unique_id("ha")
    sent = provision_chain(instance_id, datastore="noop", boot="none", ping_deadline_s=60).apply_async()
    wait_until(lambda: queues.exists(records().client, instance_id), 30, message="queue created")
    guest = HostileGuest(guest_identity(instance_id)[0])
    reply = {"doc": b""}

    def answer(task: str, task_id: str) -> bytes:
        if task == "guest.ping":
            return pong(instance_id)
        return prepared(instance_id) if task == "guest.prepare" else reply["doc"]

    guest.serve(answer)
    sent.get(timeout=60)
    wait_for_status(records(), instance_id, [Status.ACTIVE], timeout_s=30)
    yield instance_id, reply
    guest.stop()


CRAFTED = {
    "deeply nested": b'{"status": "SUCCESS", "result": ' + b"[" * 3000 + b"]" * 3000 + b"}",
    "not UTF-8": b'{"status": "SUCCESS", "result": "\xff\xfe"}',
    "not a document": b"[1, 2]",
    "bad JSON": b'{"status": "SUCCESS", "result": ',
    "not a list": result_document("SUCCESS", {"users": []}),
    "a list of numbers": result_document("SUCCESS", [1, 2]),
    "a user without a name": result_document("SUCCESS", [{"databases": []}]),
    "an unknown status": b'{"status": "\\u001b[2J", "result": []}',
    "NaN": b'{"status": "SUCCESS", "result": NaN}',
    "too large": result_document("SUCCESS", ["x" * 1000] * 300),
    "a failure with control characters": result_document("FAILURE", {"exc_type": TERMINAL_TRICKS,
                                                                     "exc_message": TERMINAL_TRICKS}),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_crafted_guest_api_answer_is_a_guest_error_in_one_line(hostile_active: tuple[str, dict[str, bytes]],
                                                                 case: str) -> None:
    instance_id, reply = hostile_active
    reply["doc"] = CRAFTED[case]
    with pytest.raises(GuestError) as raised:
        guestapi.call(instance_id, "list_users", timeout_s=10)
    message = str(raised.value)
    assert message.startswith(f"guest of {instance_id}: list_users") and printable(message) and "\n" not in message


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(result=ANY_JSON)
def test_any_guest_api_answer_is_its_result_or_a_guest_error(hostile_active: tuple[str, dict[str, bytes]],
                                                            result: Any) -> None:
    instance_id, reply = hostile_active
    reply["doc"] = result_document("SUCCESS", result)
    try:
        users = guestapi.call(instance_id, "list_users", timeout_s=10)
    except GuestError as exc:
        assert printable(str(exc)) and "\n" not in str(exc)
    else:
        assert isinstance(users, list) and all(isinstance(u, dict) and isinstance(u["name"], str) for u in users)


# --- bounded storage ------------------------------------------------------------------------------


def test_the_embedded_broker_bounds_memory_values_and_subscribers(private_redis: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(private_redis.url, decode_responses=True)
    found = {**client.config_get("maxmemory*"), **client.config_get("proto-max-bulk-len"),
             **client.config_get("client-output-buffer-limit")}
    config = {str(k): str(v) for k, v in found.items()}
    assert int(config["maxmemory"]) > 0 and config["maxmemory-policy"] == "noeviction"
    assert int(config["proto-max-bulk-len"]) <= 4 * 1024 * 1024
    assert "pubsub 67108864 16777216 60" in config["client-output-buffer-limit"]
    assert limit_warnings(client) == []
    with pytest.raises(redis.RedisError):
        redis.Redis.from_url(private_redis.url).set("big", b"x" * 3_000_000)
    assert not client.exists("big")


def test_the_settings_check_warns_about_a_broker_without_limits(tmp_path: Path) -> None:
    from berth.redis_server import free_port

    port = free_port()
    server = Proc([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
                   "--save", ""], tmp_path / "redis.log")
    try:
        client = redis.Redis(port=port, decode_responses=True)
        wait_until(lambda: _answers(client), 15, message="bare redis up")
        warnings = limit_warnings(client)
        assert [w.split()[0] for w in warnings] == ["no", "proto-max-bulk-len"], warnings
        client.config_set("maxmemory-policy", "allkeys-lru")
        assert "silently evicts" in limit_warnings(client)[1]
        client.config_set("maxmemory", "100mb")
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("proto-max-bulk-len", "1mb")
        assert limit_warnings(client) == []
    finally:
        server.stop()


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


# --- the parsers, fuzzed --------------------------------------------------------------------------


@given(raw=st.binary(max_size=600) | ANY_JSON.map(lambda v: json.dumps(v).encode()))
def test_any_stored_answer_parses_to_an_answer_or_nothing(raw: bytes) -> None:
    answer = waiting.parse(raw)
    if answer is not None:
        assert answer.state in {*waiting.FINAL_STATES, waiting.MALFORMED}
        assert printable(answer.error()) and "\n" not in answer.error()


@given(raw=st.binary(max_size=600) | st.integers(-1, 10**9) | ANY_JSON.map(lambda v: json.dumps(v).encode()))
def test_any_heartbeat_is_a_report_or_malformed(raw: bytes | int) -> None:
    try:
        report = heartbeats.parse_report("hb-x", "r", raw)
    except Malformed as exc:
        assert printable(str(exc))
    else:
        assert report["instance_id"] == "hb-x"


@given(raw=st.binary(max_size=600) | st.integers(-1, 10**9) | ANY_JSON.map(lambda v: json.dumps(v).encode()))
def test_any_dead_letter_reads_as_an_entry(raw: bytes | int) -> None:
    entry = untrusted.clean(deadletters.normalise(deadletters._entry(raw)))
    assert set(entry) == {"reason", "error", "task", "id", "content_type", "size", "received_at"}
    assert all(printable(v) for v in entry.values() if isinstance(v, str))


@given(value=ANY_JSON, name=st.sampled_from(["list_users", "list_databases", "get_status", "restart"]))
def test_an_answers_shape_is_checked_with_the_projects_error_only(value: Any, name: str) -> None:
    try:
        check_answer(name, value)
    except Malformed as exc:
        assert printable(str(exc))
    try:
        connection = check_connection(value)
    except Malformed:
        return
    assert set(connection) <= {"datastore", "host", "port", "users", "databases", "key_prefixes"}


@given(text=NASTY_TEXT | st.text())
def test_escaped_text_is_printable_and_one_line(text: str) -> None:
    escaped = untrusted.escape(text)
    assert escaped.isprintable()
    assert escaped == text or "\\" in escaped


def test_a_document_nested_too_deep_or_too_large_is_malformed_before_it_is_parsed() -> None:
    for raw, why in ((b"[" * 100_000, "over"), (b"[" * 3000, "nested"), (b"\xff", "UTF-8"), (b"NaN", "not JSON")):
        with pytest.raises(Malformed, match=why):
            untrusted.decode_json(raw, "x", 50_000)
