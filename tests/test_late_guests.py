"""A hundred late guests do not stall the taskmanager: no step holds a slot while it waits."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from berth.records import Reason, Records, Status
from tests.helpers import wait_for_status, wait_until
from workflows import provision_chain

pytestmark = [pytest.mark.broker, pytest.mark.usefixtures("taskmanager")]
LATE = 100


def test_an_instance_with_a_live_guest_goes_active_while_a_hundred_guests_are_late(
        new_id: Callable[[str], str], records: Records) -> None:
    late = [new_id("late") for _ in range(LATE)]
    for instance_id in late:
        provision_chain(instance_id, datastore="noop", boot="none", ping_deadline_s=120).apply_async()
    # Wait until every late instance is really waiting for its guest (pinging), then start another.
    wait_until(lambda: all((r := records.get(i)) and r.get("ping_attempts", 0) >= 2 for i in late), 30,
               interval_s=0.2, message="all late instances pinging")
    live = new_id("live")
    provision_chain(live, datastore="noop").apply_async()
    try:
        record = wait_for_status(records, live, timeout_s=60)
        assert record.status is Status.ACTIVE
        statuses = {records.get(i).status for i in late}  # type: ignore[union-attr]
        assert statuses == {Status.BUILD}, "the live instance finished while every late one was still waiting"
    finally:
        # As an operator would: give up on the late ones, so their chains stop pinging.
        for instance_id in late:
            records.transition(instance_id, Status.FAILED, [Status.BUILD], "test-teardown",
                               reason=Reason.GUEST_UNREACHABLE, error="given up by the test")


BACKLOG = 400


def test_a_request_is_taken_before_a_backlog_of_chain_steps() -> None:
    """A wave's steps queue up; a request sent after them (here a no-op task, as the benchmark's
    probe) is taken while most of them still wait: on Redis by priority, on RabbitMQ by the steps'
    queue of their own and a prefetch per queue (celeryconfig.berth_steps_queue)."""
    from tasks import app
    from tasks.runtime import broker

    route = dict(app.conf.task_routes["taskmanager.verify"])  # exactly as the chains' steps travel
    steps_queue = route["queue"]
    with app.producer_or_acquire() as producer:
        for _ in range(BACKLOG):
            app.send_task("celery.accumulate", args=[1], producer=producer, **route)
    assert not broker().nothing_ready(steps_queue), "the backlog is queued"
    assert app.send_task("celery.accumulate", args=[7]).get(timeout=60) == [7]
    assert not broker().nothing_ready(steps_queue), \
        f"the request was taken only once the {BACKLOG} steps before it were gone"
    # The backlog drains (no-op tasks): nothing is left for the next test.
    wait_until(lambda: broker().nothing_ready(steps_queue), 120, interval_s=0.2, message="the backlog drained")
