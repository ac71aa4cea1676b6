"""Prepare is never lost and never applied twice; nothing stale runs; nothing is stranded."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from celery import chain

from berth.errors import InstanceExists, PrepareTimeout, QueueMissing
from berth.ids import prepare_task_id, step_task_id
from berth.records import Reason, Records, Status
from guest import deadletters
from tasks import channel
from tasks.runtime import broker, redis_client
from tasks.taskmanager import create_queue, send_prepare, verify
from tests.brokers import on_rabbitmq
from tests.helpers import (
    Proc,
    drop_guest_queue,
    guest_identity,
    guest_journal,
    send_to_guest,
    wait_for_status,
    wait_until,
)
from tests.stack import Stack
from workflows import provision_chain


def rabbit_ready(instance_id: str) -> int | None:
    """Messages ready in guest.ID on RabbitMQ (None: no such queue)."""
    from berth.brokers import RabbitBroker
    from berth.ids import guest_queue

    current = broker()
    assert isinstance(current, RabbitBroker)
    found = current.topology.inspect(guest_queue(instance_id))
    return None if found is None else found[0]


pytestmark = [pytest.mark.broker, pytest.mark.usefixtures("taskmanager")]


def test_provisioning_the_same_id_twice_from_python_is_refused(new_id: Callable[[str], str],
                                                              records: Records) -> None:
    instance_id = new_id("twice")
    first = provision_chain(instance_id, datastore="noop", config={"prepare_seconds": 1}).apply_async()
    wait_for_status(records, instance_id, [Status.BUILD])
    second = provision_chain(instance_id, datastore="redis").apply_async()
    assert first.get(timeout=60)["status"] == "ACTIVE"
    record = records.get(instance_id)
    assert record is not None and record["datastore"] == "noop", "the second request changed nothing"
    with pytest.raises(InstanceExists):
        second.parent.parent.parent.get(timeout=30)  # its create_queue refused it


@pytest.mark.parametrize("iteration", range(2))
def test_the_same_prepare_delivered_twice_is_applied_once(new_id: Callable[[str], str], records: Records,
                                                         iteration: int) -> None:
    """A second copy of a prepare that already ran (as after a lost ack) is refused as a replay.

    A copy arriving while the first had not finished (a guest killed mid-prepare) reaches the
    journal instead, which applies it once: see the guest drill in test_drills.py.
    """
    instance_id = new_id("dup")
    provision_chain(instance_id, datastore="noop").apply_async().get(timeout=60)
    record = records.get(instance_id)
    assert record is not None
    prepare_id = prepare_task_id(instance_id, record["request_id"])
    kwargs = {"instance_id": instance_id, "datastore": "noop", "users": [], "databases": [], "config": {}}
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30)
    channel.publish(instance_id, "guest.prepare", kwargs=kwargs, task_id=prepare_id,
                   expires=expires, key=guest_identity(instance_id)[1])
    wait_until(lambda: deadletters.read(redis_client(), instance_id), 30, message="second copy refused")
    [entry] = deadletters.read(redis_client(), instance_id)
    assert (entry["id"], entry["reason"]) == (prepare_id, "replayed")
    entry = guest_journal(instance_id)
    assert list(entry["deliveries"].values()) == [1] and list(entry["applied"].values()) == [1]


def test_a_guest_that_appears_after_a_prepare_timeout_runs_no_stale_prepare(
        new_id: Callable[[str], str], records: Records, start_guest: Callable[[str], Proc]) -> None:
    instance_id = new_id("stale")
    # The chain's own steps, with the guest still absent when prepare is sent.
    steps = chain(create_queue.si(instance_id, datastore="noop", boot="none", prepare_deadline_s=1),
                  send_prepare.si(instance_id), verify.si(instance_id))
    with pytest.raises(PrepareTimeout):
        steps.apply_async().get(timeout=30)
    record = records.get(instance_id)
    assert record is not None and record.reason == Reason.PREPARE_TIMEOUT
    guest = start_guest(instance_id)
    wait_until(lambda: " ready." in guest.log(), 30, message="guest ready")
    probe = send_to_guest(instance_id, "guest.ping", "probe")
    assert probe.get(timeout=20)["instance_id"] == instance_id
    assert "guest.prepare" not in guest.log().split(" ready.", 1)[1]
    assert guest_journal(instance_id) == {}


def test_an_expired_prepare_is_discarded_by_the_guest_unrun(new_id: Callable[[str], str],
                                                           start_guest: Callable[[str], Proc]) -> None:
    instance_id = new_id("exp")
    broker().declare_guest_queue(instance_id)
    expires_at = time.time() + 0.5
    stale = send_to_guest(instance_id, "guest.prepare", "prepare.x",
                          kwargs={"instance_id": instance_id, "datastore": "noop", "users": [], "databases": [],
                                  "config": {}}, expires=dt.datetime.fromtimestamp(expires_at, dt.UTC))
    wait_until(lambda: time.time() > expires_at + 0.1, 5, message="prepare expired")
    guest = start_guest(instance_id)
    if on_rabbitmq():
        # RabbitMQ drops it itself (Celery gives the message a TTL from its expiry): the guest,
        # consuming, finds the queue empty.
        wait_until(lambda: broker().consumers(instance_id) == 1, 30, message="guest consuming")
        wait_until(lambda: rabbit_ready(instance_id) == 0, 10, message="expired prepare gone from the queue")
    else:
        wait_until(lambda: f"refused a message on guest.{instance_id} (expired" in guest.log(), 30,
                   message="expired prepare refused")
    assert stale.state == "PENDING", "no answer: it never ran"
    assert guest_journal(instance_id) == {}


def test_an_unexpected_error_in_a_step_fails_the_instance_instead_of_stranding_it(
        new_id: Callable[[str], str], records: Records, taskmanager: Proc) -> None:
    instance_id = new_id("oops")
    create_queue.apply_async(args=[instance_id], kwargs={"datastore": "noop", "boot": "none"},
                             ignore_result=False).get(timeout=20)
    drop_guest_queue(instance_id)  # the queue vanished behind the taskmanager's back
    request_id = records.get(instance_id)["request_id"]  # type: ignore[index]
    # Not the instance's own chain: changes nothing.
    stray = send_prepare.apply_async(args=[instance_id], ignore_result=False)
    with pytest.raises(QueueMissing):
        stray.get(timeout=20)
    # The worker logs the failure after on_failure has run: only then is the record final.
    wait_until(lambda: f"send_prepare[{stray.id}] raised expected" in taskmanager.log(), 10,
               message="the stray call's failure handled")
    assert records.get(instance_id).status is Status.BUILD  # type: ignore[union-attr]
    own = send_prepare.apply_async(args=[instance_id], task_id=step_task_id(instance_id, request_id, "send_prepare"),
                                   ignore_result=False)
    with pytest.raises(QueueMissing):
        own.get(timeout=20)
    # Celery stores the task's failure, then runs its on_failure: the record follows at once.
    record = wait_for_status(records, instance_id, [Status.FAILED], timeout_s=10)
    assert record.reason == Reason.INTERNAL_ERROR
    assert "QueueMissing" in record["error"]


def provision_on_fresh_stack(root: Path, home: Path, password: str) -> int:
    """Provision again-1 (redis, user app) on a new broker and taskmanager; return its port."""
    stack = Stack(root, home=home)
    try:
        stack.start_taskmanager()
        out = stack.cli("provision", "again-1", "--datastore", "redis", "--user", f"app:{password}",
                        "--database", "app", "--wait")
        assert out.returncode == 0, out.stdout + out.stderr
        port = int(json.loads(stack.cli("show", "again-1").stdout)["connection"]["port"])
        assert redis.Redis(port=port, username="app", password=password).ping()
        assert list(guest_journal("again-1", home)["applied"].values()) == [1]
        return port
    finally:
        stack.close()


def test_a_new_request_for_an_id_gets_a_fresh_guest_not_the_old_ones_guest_journal(tmp_path: Path) -> None:
    home = tmp_path / "home"
    provision_on_fresh_stack(tmp_path / "a", home, "first-password")
    # A second control plane (new broker, no record of again-1) on the same host: a new machine,
    # whose datastore has the second request's password and no trace of the first.
    provision_on_fresh_stack(tmp_path / "b", home, "second-password")
