"""Guest queues: created by the taskmanager first, consumed only by their own guest."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest

from berth.brokers.redis import queues
from berth.errors import QueueMissing
from berth.ids import binding_keys, queue_lists
from guest import deadletters
from tasks import app, channel
from tasks.runtime import redis_client
from tests.helpers import send_to_guest, wait_until


def later(seconds: float = 60) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)


def ping(instance_id: str, name: str, target: str | None = None) -> Any:
    return send_to_guest(instance_id, "guest.ping", name, kwargs={"instance_id": target or instance_id})


def test_create_queue_writes_the_binding_and_is_idempotent(new_id: Callable[[str], str]) -> None:
    instance_id = new_id("q")
    assert not queues.exists(redis_client(), instance_id)
    queues.declare(redis_client(), instance_id)
    queues.declare(redis_client(), instance_id)
    assert queues.exists(redis_client(), instance_id)
    member = f"guest.{instance_id}\x06\x16\x06\x16guest.{instance_id}"
    assert redis_client().smembers(binding_keys(instance_id)[0]) == {member}


def test_declare_writes_what_kombus_own_declare_writes_and_again_after_a_delete(new_id: Callable[[str], str]) -> None:
    ours, kombus = new_id("qo"), new_id("qk")
    queues.declare(redis_client(), ours)
    with app.connection_for_write() as conn:
        channel.queue_for(kombus)(conn.default_channel).declare()
    client = redis_client()

    def shape(instance_id: str) -> set[str]:
        return {str(m).replace(instance_id, "ID") for m in client.smembers(binding_keys(instance_id)[0])}

    assert shape(ours) == shape(kombus) != set()
    # Deleted (its keys removed), then provisioned again: the queue is there again.
    client.delete(*binding_keys(ours))
    queues.declare(redis_client(), ours)
    assert queues.exists(client, ours)


def test_a_message_sent_before_its_guest_exists_is_consumed_once_the_guest_starts(
        new_id: Callable[[str], str], start_guest: Callable[[str], Any]) -> None:
    instance_id = new_id("early")
    queues.declare(redis_client(), instance_id)
    result = ping(instance_id, "early")
    assert redis_client().llen(f"guest.{instance_id}") == 1, "the message waits in the pre-created queue"
    start_guest(instance_id)
    assert result.get(timeout=30)["instance_id"] == instance_id
    assert redis_client().llen(f"guest.{instance_id}") == 0


def test_publishing_to_a_queue_that_was_never_created_is_refused_and_creates_nothing(
        new_id: Callable[[str], str]) -> None:
    instance_id = new_id("nq")
    with pytest.raises(QueueMissing, match="create_queue first"):
        ping(instance_id, "x")
    assert not list(redis_client().scan_iter(match=f"*{instance_id}*"))


def test_a_guest_consumes_only_its_own_queue(new_id: Callable[[str], str], start_guest: Callable[[str], Any]) -> None:
    mine, other = new_id("mine"), new_id("other")
    for instance_id in (mine, other):
        queues.declare(redis_client(), instance_id)
    start_guest(mine)
    foreign = ping(other, "p")
    own = ping(mine, "p")
    assert own.get(timeout=30)["instance_id"] == mine
    # The guest has served a message published after the foreign one; the foreign one is untouched.
    assert redis_client().llen(f"guest.{other}") == 1
    assert foreign.state == "PENDING"


def test_a_guest_never_declares_its_queue(new_id: Callable[[str], str], start_guest: Callable[[str], Any]) -> None:
    instance_id = new_id("nodecl")
    guest = start_guest(instance_id)
    wait_until(lambda: " ready." in guest.log(), 30, message="guest ready")
    assert not list(redis_client().scan_iter(match=f"*{instance_id}*")), "the guest wrote no key of its own"
    assert "guest." + instance_id in guest.log(), "the banner names the one queue it consumes"


def test_a_guest_refuses_a_message_for_another_instance_and_keeps_serving(
        new_id: Callable[[str], str], start_guest: Callable[[str], Any]) -> None:
    mine, other = new_id("own"), new_id("else")
    queues.declare(redis_client(), mine)
    start_guest(mine)
    retargeted = ping(mine, "wrong", target=other)
    assert ping(mine, "right").get(timeout=30)["instance_id"] == mine
    # Served in order: the retargeted one came first, and was refused without an answer.
    refused = deadletters.read(redis_client(), mine)
    assert [(e["id"], e["reason"]) for e in refused] == [(retargeted.id, "retargeted")]
    assert retargeted.state == "PENDING"


def test_purge_empties_every_priority_list_but_keeps_the_queue(new_id: Callable[[str], str]) -> None:
    instance_id = new_id("purge")
    queues.declare(redis_client(), instance_id)
    client = redis_client()
    for name in queue_lists(instance_id):
        client.lpush(name, "{}")
    assert queues.purge(client, instance_id) == 4
    assert all(client.llen(name) == 0 for name in queue_lists(instance_id))
    assert queues.exists(client, instance_id)
