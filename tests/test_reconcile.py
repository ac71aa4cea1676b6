"""The reconciler resumes a chain whose message is lost, and only then.

A chain that is merely slow (its next step still queued, at whatever priority, or held by a
taskmanager: a retry waiting for its countdown, a message prefetched behind a backlog) is left
alone: resuming it would run its steps twice for nothing, which is what a wave of 1,000
provisionings did before.

Each test reads a private broker that no taskmanager consumes from, so that a message put in a
queue stays there while the reconciler looks. A chain it resumes is published with the test
session's app, to the session's broker, where no such instance exists: its first step finds no
record and does nothing.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from berth.brokers import RedisBroker
from berth.ids import (
    INFLIGHT_KEY,
    NODES_KEY,
    TASKMANAGER_QUEUE,
    kombu_lists,
    node_unacked_keys,
    record_key,
    step_task_id,
)
from tasks.reconcile import reconcile
from tests.helpers import unique_id

STALL_S = 30.0


def resumed(client: redis.Redis) -> list[str]:
    """What the reconciler resumes on the test's private broker, LATER seconds from now."""
    kwargs = client.connection_pool.connection_kwargs
    url = f"redis://:{kwargs['password']}@{kwargs['host']}:{kwargs['port']}/{kwargs.get('db') or 0}"
    return reconcile(RedisBroker(url, url), client, STALL_S, now=time.time() + LATER)
LATER = 1000.0  # seconds ahead: the instance is stalled


def message(task_id: str, task: str = "taskmanager.create_queue", args: list[Any] | None = None) -> str:
    """A message as kombu keeps it in a queue list or an unacked hash (payload, exchange, key)."""
    body = base64.b64encode(json.dumps([args or [], {}, {}]).encode()).decode()
    return json.dumps([{"body": body, "headers": {"id": task_id, "task": task},
                        "properties": {"body_encoding": "base64"}}, "taskmanager", "taskmanager"])


@pytest.fixture
def broker(stack: Any) -> redis.Redis:
    client: redis.Redis = stack.client()
    return client


@pytest.fixture
def building(broker: redis.Redis) -> Iterator[str]:
    """An instance in BUILD that has not booted yet (its next step: create_queue, which boots it)."""
    instance_id = unique_id("rec")
    broker.hset(record_key(instance_id), mapping={
        "instance_id": instance_id, "status": "BUILD", "request_id": f"req-{instance_id}", "boot": "none",
        "datastore": "noop", "created_at": str(time.time()), "boot_delay_s": "0", "ping_deadline_s": "1",
        "prepare_deadline_s": "1", "users": "[]", "databases": "[]", "config": "{}"})
    broker.zadd(INFLIGHT_KEY, {instance_id: time.time()})
    yield instance_id


def test_a_step_queued_at_the_steps_priority_is_not_resumed(broker: redis.Redis, building: str) -> None:
    step_list = kombu_lists(TASKMANAGER_QUEUE)[2]  # the steps' priority (6)
    broker.rpush(step_list, message("someone-else.create_queue.x"))
    assert resumed(broker) == [], "a busy queue may hold its step"
    broker.delete(step_list)
    assert resumed(broker) == [building]


def test_a_step_held_by_a_taskmanager_is_not_resumed_and_a_lost_one_is(broker: redis.Redis, building: str) -> None:
    client = broker
    node = "tm-test-held@nowhere"
    held = node_unacked_keys(node)["unacked_key"]
    task_id = step_task_id(building, f"req-{building}", "create_queue")
    client.sadd(NODES_KEY, node)
    client.hset(held, "tag-1", message(task_id))
    try:
        assert resumed(client) == [], "held by a node: slow, not lost"
    finally:
        client.delete(held)
        client.srem(NODES_KEY, node)
    assert resumed(client) == [building], "held nowhere: lost"


def test_a_request_held_by_a_taskmanager_is_not_resumed(broker: redis.Redis, building: str) -> None:
    """A provisioning request's id is the request's, not the instance's: its argument names it."""
    node = "tm-test-request@nowhere"
    held = node_unacked_keys(node)["unacked_key"]
    broker.sadd(NODES_KEY, node)
    broker.hset(held, "tag-1", message("0f9c2d4e-request", "workflows.provision", [building]))
    assert resumed(broker) == []
