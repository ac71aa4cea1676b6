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
