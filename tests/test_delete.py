"""Delete: the guest shuts its datastore down, stops, and nothing of the instance stays on the broker."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis

from berth.errors import InstanceNotFound
from berth.ids import record_key
from berth.records import Records, Status
from tasks import app
from tasks.drivers import LocalDriver
from tasks.runtime import redis_client
from tests.helpers import Proc, wait_for_status, wait_until, workflows_cli
from workflows import submit

pytestmark = [pytest.mark.broker, pytest.mark.usefixtures("taskmanager")]


def keys_naming(instance_id: str) -> list[str]:
    """Every key on the broker whose name contains the instance id."""
    return sorted(str(k) for k in redis_client().scan_iter(match=f"*{instance_id}*", count=1000))


def delete(instance_id: str) -> Any:
    return app.send_task("workflows.delete", args=[instance_id])


def test_a_deleted_batch_leaves_no_key_but_its_audit_record(new_id: Callable[[str], str], records: Records) -> None:
    ids = [new_id("del") for _ in range(3)]
    password = "batch-pass-123"
    submit(ids[0], datastore="redis", users=[{"name": "app", "password": password}], databases=["app"])
    for instance_id in ids[1:]:
        submit(instance_id, datastore="noop")
    for instance_id in ids:
        assert wait_for_status(records, instance_id).status is Status.ACTIVE
    port = records.get(ids[0])["connection"]["port"]  # type: ignore[index]
    assert redis.Redis(port=port, username="app", password=password).ping()
    assert any("celery-task-meta" in k for k in keys_naming(ids[0])), "results exist before delete"

    out = workflows_cli("delete", ids[0], "--wait")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{ids[0]}: guest shut its datastore down" in out.stdout and "DELETED" in out.stdout
    for instance_id in ids[1:]:
        delete(instance_id)
    for instance_id in ids:
        record = wait_for_status(records, instance_id, [Status.DELETED], timeout_s=60)
        assert record["guest_shutdown"] == "done"
        assert record["prepare_applied"] == 1 and record["prepare_deliveries"] == 1, "the audit survives"
        assert keys_naming(instance_id) == [record_key(instance_id)], "only the audit record is left"
        # The expiry is set a moment after the status changes (remove_instance: transition, then EXPIRE).
        ttl = wait_until(lambda: (t := redis_client().ttl(record_key(instance_id))) > 0 and t,  # noqa: B023
                         10, message="the audit record's expiry")
        assert ttl <= app.conf.berth_deleted_record_ttl_s
        assert LocalDriver().pid(instance_id) is None
        assert not LocalDriver().guest_dir(instance_id).exists()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=port, socket_connect_timeout=1).ping()


def test_deleting_an_instance_in_build_stops_its_chain_cleanly(new_id: Callable[[str], str], records: Records,
                                                              taskmanager: Proc) -> None:
    instance_id = new_id("delbuild")
    # No guest ever comes: the chain is pinging when delete arrives.
    submit(instance_id, datastore="noop", boot="none", ping_deadline_s=120)
    wait_until(lambda: getattr(records.get(instance_id), "fields", {}).get("ping_attempts", 0) >= 3, 30,
               message="pinging")
    delete(instance_id)
    record = wait_for_status(records, instance_id, [Status.DELETED], timeout_s=60)
    assert record.get("chain_stopped_at"), "delete waited for the chain to stop"
    assert record["guest_shutdown"] == "no answer to ping"
    assert f"instance {instance_id}: provisioning chain stopped at taskmanager.ping_guest" in taskmanager.log()
    assert keys_naming(instance_id) == [record_key(instance_id)]
    # The chain is gone: a fresh provisioning of the same id starts from scratch and succeeds.
    second = submit(instance_id, datastore="noop")
    final = wait_for_status(records, instance_id, timeout_s=60)
    assert final.status is Status.ACTIVE and final["request_id"] == second != record["request_id"]


def test_delete_refuses_bad_ids_and_unknown_instances_clearly(new_id: Callable[[str], str]) -> None:
    bad = workflows_cli("delete", "Bad_ID")
    assert bad.returncode == 2 and "instance_id" in bad.stderr and "'Bad_ID'" in bad.stderr
    unknown = new_id("nobody")
    missing = workflows_cli("delete", unknown)
    assert missing.returncode == 1 and f"no instance '{unknown}'" in missing.stderr
    with pytest.raises(InstanceNotFound):
        delete(unknown).get(timeout=20)


def test_deleting_twice_is_harmless(new_id: Callable[[str], str], records: Records) -> None:
    instance_id = new_id("deltwice")
    submit(instance_id, datastore="noop")
    wait_for_status(records, instance_id)
    delete(instance_id).get(timeout=20)
    wait_for_status(records, instance_id, [Status.DELETED], timeout_s=60)
    assert delete(instance_id).get(timeout=20)["status"] == "DELETED"
    again = workflows_cli("delete", instance_id)
    assert again.returncode == 0 and "already deleted" in again.stdout


def test_submit_takes_its_record_back_when_the_request_cannot_be_sent(
        new_id: Callable[[str], str], records: Records, monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker answers the record's write, then refuses the publish: nothing half-created stays."""
    from kombu.exceptions import OperationalError

    import workflows
    from berth.ids import secrets_key

    def unsendable(*args: Any, **kwargs: Any) -> None:
        raise OperationalError("broker went away")

    monkeypatch.setattr(workflows, "send_request", unsendable)
    instance_id = new_id("unsent")
    with pytest.raises(OperationalError):
        submit(instance_id, datastore="redis", users=[{"name": "app", "password": "unsent-pass-1"}])
    assert records.get(instance_id) is None
    assert not redis_client().exists(secrets_key(instance_id))
    assert redis_client().zscore("berth:inflight", instance_id) is None


def test_a_stale_redelivery_of_a_deleted_instances_request_brings_nothing_back(
        new_id: Callable[[str], str], records: Records) -> None:
    from berth.errors import RequestFinished

    instance_id = new_id("stale")
    request_id = submit(instance_id, datastore="noop")
    wait_for_status(records, instance_id)
    delete(instance_id)
    wait_for_status(records, instance_id, [Status.DELETED], timeout_s=60)
    # The provisioning request's message again, as if an ack had been lost and it came back late.
    late = app.send_task("workflows.provision", args=[instance_id], kwargs={"datastore": "noop"}, task_id=request_id)
    with pytest.raises(RequestFinished):
        late.get(timeout=20)
    record = records.get(instance_id)
    assert record is not None and record.status is Status.DELETED
    assert keys_naming(instance_id) == [record_key(instance_id)]


def test_a_recorded_delete_whose_message_is_lost_is_finished_by_the_reconciler(
        new_id: Callable[[str], str], records: Records, taskmanager: Proc) -> None:
    """`submit_delete` records DELETING before it sends: were the message lost (a taskmanager
    killed between BRPOP and its unacked write), the reconciler runs the delete chain."""
    import uuid

    from workflows import mark_deleting

    instance_id = new_id("dellost")
    submit(instance_id, datastore="noop")
    wait_for_status(records, instance_id, [Status.ACTIVE])
    assert mark_deleting(instance_id, str(uuid.uuid4())) is Status.DELETING  # and no message at all
    record = wait_for_status(records, instance_id, [Status.DELETED], timeout_s=90)
    assert record["guest_shutdown"] == "done"
    assert f"instance {instance_id}: delete chain stalled" in taskmanager.log()
    assert keys_naming(instance_id) == [record_key(instance_id)]


def test_submit_delete_refuses_a_bad_or_unknown_id_and_sends_nothing() -> None:
    from berth.errors import InvalidInstanceId
    from workflows import submit_delete

    with pytest.raises(InvalidInstanceId):
        submit_delete("Bad_Id")
    with pytest.raises(InstanceNotFound):
        submit_delete("never-provisioned-here")
