"""RabbitMQ itself: guests' users, publisher confirms and `mandatory`, consumers, queue types,
a broker that is down or refuses. Runs only on RabbitMQ (`make test`'s second session).

The isolation tests of tests/test_isolation.py, translated: guest A's RabbitMQ user may consume
guest.A and do nothing else, whatever it tries over AMQP.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import amqp
import pytest
from amqp.exceptions import AccessRefused, ChannelError, ConnectionForced, NotAllowed
from kombu.entity import Queue

from berth.brokers import RabbitBroker
from berth.brokers.rabbitmq.admin import ManagementAPI
from berth.ids import INFLIGHT_KEY, STEPS_QUEUE, guest_queue, record_key
from berth.keys import SIGNATURE_HEADER, GuestKey
from berth.paths import PROJECT_DIR
from berth.records import Reason, Records, Status
from devtools.rabbitmq import free_ports
from guest import deadletters
from tasks.celery_app import app
from tasks.runtime import broker, raw_redis_client, redis_client
from tests.helpers import Proc, guest_identity, project_env, send_to_guest, unique_id, wait_until, workflows_cli
from tests.stack import Stack
from workflows import provision_chain

pytestmark = [pytest.mark.rabbitmq, pytest.mark.usefixtures("taskmanager")]
REFUSED = (AccessRefused, NotAllowed, ConnectionForced, ChannelError)


def rabbit() -> RabbitBroker:
    current = broker()
    assert isinstance(current, RabbitBroker), "this session runs on RabbitMQ"
    return current


def admin() -> ManagementAPI:
    return rabbit().admin


def connect(url: str) -> amqp.Connection:
    """A raw AMQP connection with the credentials of ``url`` (the first of a failover list)."""
    parts = urlsplit(url.split(";")[0])
    path = unquote(parts.path[1:]) if parts.path.startswith("/") else ""
    conn = amqp.Connection(f"{parts.hostname}:{parts.port}", userid=unquote(parts.username or ""),
                           password=unquote(parts.password or ""), virtual_host=path or "/", connect_timeout=5)
    conn.connect()
    return conn


def attempt(url: str, action: Callable[[Any], Any]) -> str:
    """Run ``action`` on a fresh channel as the user of ``url``; "allowed" or the broker's refusal.

    A publish is asynchronous in AMQP: a passive declare of the user's own queue after it makes
    the broker's verdict on the publish arrive before we answer."""
    conn = connect(url)
    try:
        channel = conn.channel()
        action(channel)
        channel.basic_qos(0, 1, False)  # a synchronous round trip: a refused publish has closed the channel
        return "allowed"
    except REFUSED as exc:
        return f"refused: {exc}"
    finally:
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - a refusal may have closed it already
            pass


def provisioned(instance_id: str) -> dict[str, str]:
    provision_chain(instance_id, datastore="noop").apply_async().get(timeout=90)
    return guest_identity(instance_id)[0]


def test_a_guests_rabbitmq_user_consumes_its_own_queue_and_nothing_else(new_id: Callable[[str], str]) -> None:
    a, b = new_id("ra"), new_id("rb")
    env_a, _ = provisioned(a), provisioned(b)
    url_a = env_a["CELERY_BROKER_URL"]
    assert f"amqp://guest.{a}:" in url_a and "berth-admin" not in url_a
    message = amqp.Message("{}", content_type="application/json")
    forbidden = {
        "declare a queue": lambda ch: ch.queue_declare("evil", durable=True),
        "declare an exchange": lambda ch: ch.exchange_declare("evil", "fanout"),
        "read B's queue": lambda ch: ch.basic_get(guest_queue(b)),
        "consume B's queue": lambda ch: ch.basic_consume(guest_queue(b), callback=lambda m: None),
        "purge B's queue": lambda ch: ch.queue_purge(guest_queue(b)),
        "read the taskmanager's queue": lambda ch: ch.basic_get("taskmanager"),
        "read the guest API's queue": lambda ch: ch.basic_get("guestapi"),
        "read the chains' steps": lambda ch: ch.basic_get(STEPS_QUEUE),
        "publish a step (default exchange)": lambda ch: ch.basic_publish(message, "", STEPS_QUEUE),
        "publish to B by name (default exchange)": lambda ch: ch.basic_publish(message, "", guest_queue(b)),
        "publish to the taskmanager (default exchange)": lambda ch: ch.basic_publish(message, "", "taskmanager"),
        "publish to its own queue": lambda ch: ch.basic_publish(message, "", guest_queue(a)),
        "publish to amq.direct": lambda ch: ch.basic_publish(message, "amq.direct", "taskmanager"),
        "publish to amq.topic": lambda ch: ch.basic_publish(message, "amq.topic", "x"),
        "publish an event": lambda ch: ch.basic_publish(message, "celeryev", "task.succeeded"),
        "bind its queue to amq.fanout": lambda ch: ch.queue_bind(guest_queue(a), "amq.fanout", ""),
        "delete its own queue": lambda ch: ch.queue_delete(guest_queue(a)),
        "delete B's queue": lambda ch: ch.queue_delete(guest_queue(b)),
    }
    allowed = {what: verdict for what, action in forbidden.items()
               if not (verdict := attempt(url_a, action)).startswith("refused")}
    assert allowed == {}, f"guest A's RabbitMQ user was allowed: {allowed}"
    assert attempt(url_a, lambda ch: ch.basic_get(guest_queue(a))) == "allowed", "it consumes its own queue"
    # The user itself: no tags, consume on guest.A only, and a connection limit.
    perms = admin().permissions(f"guest.{a}")
    assert perms == {"configure": "^$", "write": "^$", "read": f"^{re.escape(guest_queue(a))}$"}
    # B is untouched and still answers through its own queue.
    pong = send_to_guest(b, "guest.ping", "ping.after-a").get(timeout=20)
    assert pong["instance_id"] == b


def test_a_guest_user_holds_at_most_a_few_connections(new_id: Callable[[str], str]) -> None:
    instance_id = new_id("rconn")
    url = provisioned(instance_id)["CELERY_BROKER_URL"]
    held: list[amqp.Connection] = []
    refusal = ""
    try:
        for _ in range(6):  # the agent holds one already
            try:
                held.append(connect(url))
            except REFUSED as exc:
                refusal = str(exc)
                break
    finally:
        for conn in held:
            conn.close()
    assert refusal, f"{len(held)} extra connections were all accepted"
    assert "limit" in refusal.lower(), refusal
    assert len(held) < 3


def test_a_guests_connections_are_seen_and_closed_the_moment_they_open(new_id: Callable[[str], str]) -> None:
    """The broker's connection tracking, not its statistics (collected every STATS_INTERVAL_S):
    a connection opened a moment ago is listed, with where it comes from, and closed."""
    instance_id = new_id("rseen")
    url = provisioned(instance_id)["CELERY_BROKER_URL"]
    user = f"guest.{instance_id}"
    [agent] = admin().connections_by(user)
    assert (agent["peer_host"], agent["ssl"]) == ("127.0.0.1", False), agent
    extra = connect(url)
    try:
        # Far sooner than the statistics database would show it (STATS_INTERVAL_S, 30 s).
        wait_until(lambda: len(admin().connections_by(user)) == 2, 3, message="the new connection listed")
        assert admin().close_connections(user) == 2
        with pytest.raises(REFUSED):
            extra.channel().basic_qos(0, 1, False)  # the broker has closed it
        wait_until(lambda: not {agent["name"]} & {c["name"] for c in admin().connections_by(user)}, 15,
                   message="the agent's connection closed")
    finally:
        try:
            extra.close()
        except Exception:  # noqa: BLE001 - closed by the broker already
            pass


def test_a_publish_to_a_queue_that_vanished_raises_instead_of_vanishing(new_id: Callable[[str], str]) -> None:
    instance_id = new_id("rgone")
    rabbit().declare_guest_queue(instance_id)
    rabbit().topology.remove(instance_id)
    # Even past Berth's own check (channel.publish refuses a queue that does not exist),
    # RabbitMQ returns the unroutable message: `mandatory`, with publisher confirms.
    with pytest.raises(Exception, match="NO_ROUTE") as caught:
        app.send_task("guest.ping", kwargs={"instance_id": instance_id}, task_id=f"{instance_id}.guest.lost",
                      queue=Queue(guest_queue(instance_id), no_declare=True), declare=[], retry=False)
    assert "312" in str(caught.value) or "NO_ROUTE" in str(caught.value)
    assert rabbit().topology.inspect(guest_queue(instance_id)) is None, "no queue was invented"


def test_rabbitmq_tells_whether_anyone_consumes_a_guest_queue(new_id: Callable[[str], str],
                                                              start_guest: Callable[[str], Proc]) -> None:
    instance_id = new_id("rcons")
    out = workflows_cli("provision", instance_id, "--datastore", "noop", "--boot", "none", "--ping-deadline", "4",
                        "--wait", timeout_s=60)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "nobody consumes its queue yet" in out.stdout, out.stdout
    record = Records(redis_client()).get(instance_id)
    assert record is not None and record.reason == Reason.GUEST_UNREACHABLE and record["guest_consumers"] == 0
    shown = json.loads(workflows_cli("show", instance_id).stdout)
    assert shown["guest_consumers"] == 0
    start_guest(instance_id)
    wait_until(lambda: broker().consumers(instance_id) == 1, 30, message="the guest consuming guest.ID")
    assert json.loads(workflows_cli("show", instance_id).stdout)["guest_consumers"] == 1


def test_delete_leaves_no_queue_user_or_binding_on_rabbitmq(new_id: Callable[[str], str]) -> None:
    instance_id = new_id("rdel")
    provisioned(instance_id)
    assert f"guest.{instance_id}" in admin().user_names()
    out = workflows_cli("delete", instance_id, "--wait", timeout_s=90)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not [q for q in admin().queue_names("") if instance_id in q]
    assert not [e for e in admin().exchange_names("") if instance_id in e]
    bindings = admin().call("GET", "/api/bindings") or []
    assert not [b for b in bindings if instance_id in json.dumps(b)]
    assert f"guest.{instance_id}" not in admin().user_names()
    wait_until(lambda: admin().connections_of(f"guest.{instance_id}") == 0, 15, message="guest connections closed")


def test_malformed_and_unsigned_messages_on_a_guest_queue_are_dead_lettered(new_id: Callable[[str], str]) -> None:
    instance_id = new_id("rbad")
    provisioned(instance_id)
    conn = connect(app.conf.broker_url)
    try:
        channel = conn.channel()
        channel.confirm_select()
        queue = guest_queue(instance_id)
        for body, headers, content_type in (
                (b"\xff\xfe not json", {}, "application/json"),
                (b"[[], {}, {}]", {"task": "guest.no_such_task", "id": f"{instance_id}.guest.unknown"},
                 "application/json"),
                (json.dumps([[], {"instance_id": instance_id}, {}]).encode(),
                 {"task": "guest.ping", "id": f"{instance_id}.guest.unsigned"}, "application/json")):
            channel.basic_publish(amqp.Message(body, content_type=content_type, content_encoding="utf-8",
                                               application_headers=headers), "", queue, mandatory=True)
    finally:
        conn.close()

    def reasons() -> list[str]:
        return sorted(str(e.get("reason")) for e in deadletters.read(raw_redis_client(), instance_id))

    wait_until(lambda: len(reasons()) >= 3, 30, message="three dead letters")
    # An unknown task is refused before Celery looks it up: nothing unsigned reaches Celery.
    assert reasons() == ["undecodable", "unsigned", "unsigned"], reasons()
    # The guest goes on serving, and nothing waits or is held on its queue.
    assert send_to_guest(instance_id, "guest.ping", "ping.after-bad").get(timeout=20)["instance_id"] == instance_id
    wait_until(lambda: rabbit().topology.inspect(guest_queue(instance_id)) == (0, 1), 15, message="queue drained")


def test_a_rabbitmq_broker_that_is_down_gives_a_clear_error_naming_no_password() -> None:
    first, second = free_ports(2)
    # A cluster's failover list: every URL's password stays out of the message.
    url = f"amqp://nobody:first-secret@127.0.0.1:{first}//;amqp://nobody:second-secret@127.0.0.1:{second}//"
    env = project_env(CELERY_BROKER_URL=url)
    out = subprocess.run([sys.executable, "-m", "workflows", "provision", "down-1", "--wait"], capture_output=True,
                         text=True, cwd=PROJECT_DIR, env=env, timeout=90)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "broker unreachable at amqp://nobody:**@127.0.0.1" in out.stderr
    assert "first-secret" not in out.stderr + out.stdout and "second-secret" not in out.stderr + out.stdout
    assert "Traceback" not in out.stderr


def test_a_taskmanager_user_without_the_administrator_tag_is_told_so_at_start(
        new_id: Callable[[str], str], tmp_path: Path) -> None:
    instance_id = new_id("rperm")
    name = f"plain-{instance_id}"
    admin().call("PUT", f"/api/users/{name}", {"password": "plain-secret", "tags": ""})
    admin().call("PUT", f"/api/permissions/%2F/{name}", {"configure": ".*", "write": ".*", "read": ".*"})
    url = urlsplit(app.conf.broker_url)
    plain_url = f"amqp://{name}:plain-secret@{url.hostname}:{url.port}//"
    env = {"CELERY_BROKER_URL": plain_url}
    proc = Proc([sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", "plainq", "--pool", "solo", "-n",
                 f"{name}@%h", "-l", "INFO"], tmp_path / "plain.log", env=project_env(**env))
    try:
        wait_until(lambda: "guests are NOT isolated" in proc.log() or not proc.alive(), 60, message="the warning")
        assert "lacks the administrator tag" in proc.log()
    finally:
        proc.stop()
        admin().delete_user(name)


def test_guest_queues_are_quorum_queues_when_the_settings_say_so(tmp_path: Path) -> None:
    stack = Stack(tmp_path, broker="rabbitmq", queue_type="quorum")
    try:
        stack.start_taskmanager()
        stack.provision("quorum-1", "--datastore", "noop")
        api = ManagementAPI(stack.broker.url, stack.env["BERTH_RABBITMQ_API"])
        assert (api.queue("guest.quorum-1") or {}).get("type") == "quorum"
        assert (api.queue("taskmanager") or {}).get("type") == "quorum"
        assert (api.queue(STEPS_QUEUE) or {}).get("type") == "quorum", "the chains' steps survive a node too"
        pong = stack.cli("ping", "quorum-1", "--timeout", "20")
        assert pong.returncode == 0, pong.stdout + pong.stderr
        deleted = stack.cli("delete", "quorum-1", "--wait")
        assert deleted.returncode == 0, deleted.stdout + deleted.stderr
        assert api.queue("guest.quorum-1") is None
        record = Records(stack.client()).get("quorum-1")
        assert record is not None and record.status is Status.DELETED
    finally:
        stack.close()


def test_forged_tampered_retargeted_and_replayed_messages_published_over_amqp_are_refused(
        new_id: Callable[[str], str], start_guest: Callable[[str], Proc]) -> None:
    """tests/test_isolation.py's signed-message test, over AMQP: genuine signed messages are taken
    off the queue (nobody consumes it yet), altered, and published back as a forger with publish
    rights would; the guest runs the genuine one once and dead-letters every other."""
    mine, other = new_id("rauth"), new_id("rauthx")
    for instance_id in (mine, other):
        rabbit().declare_guest_queue(instance_id)
    send_to_guest(mine, "guest.ping", "genuine")
    send_to_guest(other, "guest.ping", "for-other")
    conn = connect(app.conf.broker_url)
    try:
        channel = conn.channel()
        genuine = wait_until(lambda: channel.basic_get(guest_queue(mine), no_ack=True), 10, message="genuine")
        for_other = wait_until(lambda: channel.basic_get(guest_queue(other), no_ack=True), 10, message="other's")

        def variant(name: str, *, headers: dict[str, Any] | None = None, body: Any = None,
                    key: GuestKey | None = None, drop: str | None = None) -> amqp.Message:
            new_headers = {**genuine.headers, "id": f"{mine}.guest.{name}", "root_id": f"{mine}.guest.{name}",
                           **(headers or {})}
            new_body = json.loads(genuine.body) if body is None else body
            if key is not None:
                new_headers[SIGNATURE_HEADER] = key.sign(instance_id=mine, headers=new_headers, body=new_body)
            if drop:
                new_headers.pop(drop)
            return amqp.Message(json.dumps(new_body), content_type="application/json", content_encoding="utf-8",
                                application_headers=new_headers, correlation_id=new_headers["id"],
                                delivery_mode=2)

        tampered_body = json.loads(genuine.body)
        tampered_body[1]["extra"] = "injected"
        cases = {
            f"{mine}.guest.unsigned": (variant("unsigned", drop=SIGNATURE_HEADER), "unsigned"),
            f"{mine}.guest.forged": (variant("forged", key=GuestKey(os.urandom(32))), "tampered"),
            f"{mine}.guest.tampered": (variant("tampered", body=tampered_body), "tampered"),
            f"{mine}.guest.renamed": (variant("renamed", headers={"task": "guest.shutdown"}), "tampered"),
            f"{mine}.guest.reid": (variant("reid"), "tampered"),
            str(for_other.headers["id"]): (amqp.Message(for_other.body, content_type="application/json",
                                                        content_encoding="utf-8",
                                                        application_headers=dict(for_other.headers)), "retargeted"),
        }
        channel.confirm_select()
        replay = amqp.Message(genuine.body, content_type="application/json", content_encoding="utf-8",
                              application_headers=dict(genuine.headers), delivery_mode=2)
        for message, _ in cases.values():
            channel.basic_publish(message, "", guest_queue(mine), mandatory=True)
        channel.basic_publish(replay, "", guest_queue(mine), mandatory=True)
        channel.basic_publish(replay, "", guest_queue(mine), mandatory=True)
    finally:
        conn.close()
    guest = start_guest(mine)
    assert send_to_guest(mine, "guest.ping", "after").get(timeout=30)["instance_id"] == mine
    genuine_id = str(genuine.headers["id"])
    expected = {task_id: reason for task_id, (_, reason) in cases.items()} | {genuine_id: "replayed"}
    wait_until(lambda: len(deadletters.read(raw_redis_client(), mine)) >= len(expected), 20,
               message="every refusal dead-lettered")
    entries = {entry["id"]: entry["reason"] for entry in deadletters.read(raw_redis_client(), mine)}
    assert entries == expected
    results = redis_client()
    for task_id in cases:
        assert not results.exists(f"celery-task-meta-{task_id}"), f"{task_id} ran"
    assert results.exists(f"celery-task-meta-{genuine_id}"), "the genuine message ran, once"
    assert guest.log().count(f"Task guest.ping[{genuine_id}] received") == 1


def test_the_reconciler_leaves_a_chain_alone_while_its_step_waits_in_the_steps_queue(tmp_path: Path) -> None:
    """The chains' steps have a queue of their own on RabbitMQ: a step waiting there is slow, not
    lost, and resuming its chain would run it twice. Read on a private node nobody consumes."""
    from tasks.reconcile import reconcile

    private = Stack(tmp_path, broker="rabbitmq")
    try:
        env = private.broker.env()
        store = private.client()
        instance_id = unique_id("rstall")
        store.hset(record_key(instance_id), mapping={
            "instance_id": instance_id, "status": "BUILD", "request_id": f"req-{instance_id}", "boot": "none",
            "datastore": "noop", "created_at": "1", "boot_delay_s": "0", "ping_deadline_s": "1",
            "prepare_deadline_s": "1", "users": "[]", "databases": "[]", "config": "{}"})
        store.zadd(INFLIGHT_KEY, {instance_id: 1.0})
        node = RabbitBroker(env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"],
                            api=env.get("BERTH_RABBITMQ_API"))
        conn = connect(env["CELERY_BROKER_URL"])
        try:
            channel = conn.channel()
            channel.queue_declare(STEPS_QUEUE, durable=True)
            channel.basic_publish(amqp.Message("{}", content_type="application/json"), "", STEPS_QUEUE)
            wait_until(lambda: not node.nothing_ready(STEPS_QUEUE), 10, message="the step is queued")
            assert reconcile(node, store, 30.0) == [], "a step waiting in taskmanager.steps: slow, not lost"
            channel.queue_purge(STEPS_QUEUE)
        finally:
            conn.close()
        assert reconcile(node, store, 30.0) == [instance_id], "no step anywhere: lost, resumed"
    finally:
        private.close()
