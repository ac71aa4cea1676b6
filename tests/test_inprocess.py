"""Taskmanager steps in an in-process worker (Celery's classic pytest fixtures, real Redis).

The worker consumes a queue of its own, so it never takes work from the session's
taskmanager process.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery

from berth.errors import InstanceExists, InvalidInstanceId, InvalidRequest
from berth.records import Records, Status
from tasks import app as tasks_app
from tasks.runtime import redis_client

QUEUE = f"inproc-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def celery_app() -> Celery:
    return tasks_app


@pytest.fixture
def celery_worker_parameters() -> dict[str, Any]:
    return {"queues": [QUEUE], "perform_ping_check": False}


def on_worker(task: Any, *args: Any, task_id: str | None = None, **kwargs: Any) -> Any:
    # A step stores no result of its own unless its caller asks for it (tasks.taskmanager.Step).
    return task.apply_async(args=args, kwargs=kwargs, queue=QUEUE, task_id=task_id,
                            ignore_result=False).get(timeout=20)


def test_create_queue_records_the_instance_and_declares_its_queue(
        celery_worker: Any, new_id: Callable[[str], str], records: Records) -> None:
    from berth.brokers.redis import queues
    from tasks.taskmanager import create_queue

    instance_id = new_id("cq")
    assert on_worker(create_queue, instance_id, datastore="noop") == instance_id
    record = records.get(instance_id)
    assert record is not None and record.status is Status.BUILD
    assert queues.exists(redis_client(), instance_id)


def test_create_queue_run_twice_for_the_same_request_is_harmless(
        celery_worker: Any, new_id: Callable[[str], str], records: Records) -> None:
    from tasks.taskmanager import create_queue

    instance_id = new_id("twice")
    first = create_queue.apply_async(args=[instance_id], kwargs={"datastore": "noop"}, queue=QUEUE,
                                     task_id=f"{instance_id}.create_queue", ignore_result=False)
    assert first.get(timeout=20) == instance_id
    created_at = records.get(instance_id)["created_at"]  # type: ignore[index]
    # A redelivery carries the same task (and root) id.
    again = create_queue.apply_async(args=[instance_id], kwargs={"datastore": "noop"}, queue=QUEUE,
                                     task_id=f"{instance_id}.create_queue", ignore_result=False)
    assert again.get(timeout=20) == instance_id
    assert records.get(instance_id)["created_at"] == created_at  # type: ignore[index]


def test_create_queue_refuses_an_id_owned_by_another_request(
        celery_worker: Any, new_id: Callable[[str], str]) -> None:
    from tasks.taskmanager import create_queue

    instance_id = new_id("own")
    on_worker(create_queue, instance_id, datastore="noop")
    with pytest.raises(InstanceExists):
        on_worker(create_queue, instance_id, datastore="noop")


@pytest.mark.parametrize(("args", "kwargs", "error", "field"), [
    (["NOPE"], {}, InvalidInstanceId, "instance_id"),
    (["ok-id"], {"datastore": "oracle"}, InvalidRequest, "datastore"),
    (["ok-id"], {"colour": "red"}, InvalidRequest, "colour"),
    (["ok-id"], {"users": [{"name": "app", "password": "x"}]}, InvalidRequest, "users[0].password"),
])
def test_the_provision_task_refuses_bad_input_naming_the_field(
        celery_worker: Any, args: list[Any], kwargs: dict[str, Any], error: type[Exception], field: str) -> None:
    from workflows.tasks import provision

    with pytest.raises(error) as info:
        on_worker(provision, *args, **kwargs)
    assert info.value.args[0] == field
    assert Records(redis_client()).get("ok-id") is None


@pytest.mark.usefixtures("taskmanager")
def test_a_redelivered_provision_request_does_not_start_its_chain_twice(
        celery_worker: Any, new_id: Callable[[str], str], records: Records) -> None:
    from berth.records import Reason
    from tests.helpers import wait_until
    from workflows.tasks import provision

    instance_id = new_id("redeliv")
    request_id = f"req-{instance_id}"
    first = on_worker(provision, instance_id, datastore="noop", boot="none", ping_deadline_s=60, task_id=request_id)
    assert first["status"] == "NEW"
    wait_until(lambda: (r := records.get(instance_id)) is not None and r.get("ping_attempts", 0) >= 1, 20,
               message="chain under way")
    try:
        # The same message again (same task id), as after a taskmanager crash before its ack; its
        # stored result goes first, so that the answer read below is the second run's.
        redis_client().delete(f"celery-task-meta-{request_id}")
        again = on_worker(provision, instance_id, datastore="noop", boot="none", ping_deadline_s=60,
                          task_id=request_id)
        assert again == {**first, "status": "BUILD"}, "it found its chain under way and started none"
    finally:
        records.transition(instance_id, Status.FAILED, [Status.BUILD], "test-teardown",
                           reason=Reason.GUEST_UNREACHABLE, error="given up by the test")


def test_an_ended_in_process_worker_leaves_no_berth_thread_behind() -> None:
    """Celery's test worker ends with a cold shutdown (`terminate`, not `stop`): the listening and
    heartbeat threads must end with it, or they go on acting on the broker for a worker that is
    gone (a prepare answer applied and logged by the test session, not by the taskmanager)."""
    import threading

    from celery.contrib.testing.worker import start_worker

    from tests.helpers import wait_until

    def berth_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("berth-") and t.is_alive()}

    before = berth_threads()
    with start_worker(tasks_app, queues=[f"{QUEUE}-ends"], perform_ping_check=False):
        started = wait_until(lambda: berth_threads() - before, 10, message="the worker's threads")
        assert {t.name for t in started} >= {"berth-prepare-answers", "berth-heartbeats"}
    wait_until(lambda: not (berth_threads() - before), 10, message="the worker's threads ended")
