"""The idle benchmark's fake guests (bench/idlefakes.py) against the session's broker: each holds
the connections a real guest agent holds, consumes its own queue with the agent's settings, and
sends only what an idle agent sends, its heartbeats signed with its own key."""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bench import idle
from bench.idlefakes import REDIS_CONNECTIONS, STORE_CONNECTIONS_BESIDE_RABBITMQ, AgentSettings, GuestSpec
from berth.brokers.redis.acl import user_name
from berth.ids import guest_queue
from berth.keys import GuestKey
from tests.brokers import on_rabbitmq
from tests.helpers import wait_until

pytestmark = pytest.mark.broker
GUESTS = 20
# What an idle real agent sends (bench/idle.py's calibration counts them): its poll, its report,
# its unacked check on a connection of its own, and redis-py's handshake and health check.
IDLE_COMMANDS = {"BRPOP", "MULTI", "RPUSH", "LTRIM", "EXEC", "ZRANGE", "HELLO", "PING"}


@pytest.fixture
def fakes(new_id: Callable[[str], str]) -> Iterator[tuple[list[GuestSpec], AgentSettings]]:
    """GUESTS fake idle guests with the guest app's settings, polling and reporting every 0.5 s."""
    from tasks import app
    from tasks.runtime import broker

    specs = idle.mint([new_id("idle") for _ in range(GUESTS)])
    settings = dataclasses.replace(AgentSettings.of_guest_app(), brpop_timeout_s=0.5, heartbeat_interval_s=0.5)
    if on_rabbitmq():
        settings = dataclasses.replace(settings, amqp_heartbeat_s=idle.negotiated_amqp_heartbeat(
            app.conf.broker_url, settings.amqp_heartbeat_s))
    running = idle.Fakes(specs, settings)
    try:
        running.wait_connected(60)
        running.heartbeats(True)
        yield specs, settings
    finally:
        running.close(10)
        for spec in specs:
            broker().revoke_guest(spec.instance_id)
            broker().remove_instance(spec.instance_id)


def seen_by_broker(specs: list[GuestSpec]) -> dict[str, Any]:
    from tasks.runtime import broker, redis_client

    admin = broker().admin if on_rabbitmq() else None  # type: ignore[attr-defined]
    return idle.connections(redis_client(), {user_name(s.instance_id) for s in specs}, admin)


def test_every_fake_guest_holds_the_connections_of_a_real_agent(fakes: Any) -> None:
    specs, settings = fakes
    if on_rabbitmq():
        expected = {"redis_connections": STORE_CONNECTIONS_BESIDE_RABBITMQ, "channels": 1, "global_prefetch": 1,
                    "consumers": 1, "amqp_heartbeat_s": settings.amqp_heartbeat_s}
    else:
        expected = {"redis_connections": REDIS_CONNECTIONS}
    # The management API's statistics are refreshed every second.
    def as_expected() -> dict[str, Any] | None:
        seen = seen_by_broker(specs)
        return seen if all(v == expected for v in seen.values()) else None

    seen = wait_until(as_expected, 30, interval_s=0.5, message=f"every fake guest seen by the broker as {expected}")
    assert seen is not None and len(seen) == GUESTS


@pytest.mark.redis
def test_a_fake_guest_polls_its_own_queue_and_sends_signed_reports_only(fakes: Any) -> None:
    from tasks.runtime import redis_client

    specs, settings = fakes
    spec = specs[0]
    store = redis_client()
    sent: list[list[str]] = []
    done = threading.Event()

    def watch() -> None:
        owner = {c["addr"]: c.get("user") for c in store.client_list()}
        with store.monitor() as monitor:
            for command in monitor.listen():
                if owner.get(f"{command.get('client_address')}:{command.get('client_port')}") == user_name(
                        spec.instance_id):
                    sent.append(command["command"].split(" "))
                kinds = collections.Counter(words[0] for words in sent)
                if kinds["BRPOP"] >= 3 and kinds["RPUSH"] >= 2:
                    break
        done.set()

    threading.Thread(target=watch, daemon=True).start()
    wait_until(done.is_set, 30, message="3 polls and 2 reports of one fake guest")
    assert {words[0] for words in sent} <= IDLE_COMMANDS
    polls = [words for words in sent if words[0] == "BRPOP"]
    keys = [key.replace("\\x06\\x16", "\x06\x16") for key in polls[0][1:-1]]
    assert keys == settings.brpop_keys(guest_queue(spec.instance_id))
    assert float(polls[0][-1]) == settings.brpop_timeout_s
    key = GuestKey.from_text(spec.key_text)
    for words in sent:
        if words[0] == "RPUSH":
            envelope = json.loads(" ".join(words[2:]).replace('\\"', '"'))
            assert envelope["report"]["instance_id"] == spec.instance_id
            assert key.verify_report(envelope["report"], envelope["mac"])
