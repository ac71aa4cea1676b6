"""A three-node RabbitMQ cluster with quorum queues loses a node and nothing else.

One cluster (three private nodes on this machine, one Erlang cookie, `devtools.rabbitmq.RabbitCluster`)
serves both drills, with a taskmanager and local guests that know every node (a failover list of
URLs). Instance records stay in the Redis store beside it, which these drills do not crash.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from berth.brokers.rabbitmq.admin import ManagementAPI
from berth.records import Reason, Records, Status
from devtools.rabbitmq import RabbitNode
from tests.helpers import wait_until
from tests.stack import Stack

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(300)]
WAVE = 8


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("cluster"), broker="cluster")
    try:
        stack.start_taskmanager()
        yield stack
    finally:
        stack.close()


def api(stack: Stack) -> ManagementAPI:
    return ManagementAPI(stack.broker.url, stack.env["BERTH_RABBITMQ_API"])


def journal(stack: Stack, instance_id: str) -> dict[str, Any]:
    path = stack.guests().guest_dir(instance_id) / "prepare.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def status(stack: Stack, instance_id: str) -> str | None:
    record = Records(stack.client()).get(instance_id)
    return None if record is None else record.status.value


def node_named(stack: Stack, name: str) -> RabbitNode:
    assert stack.broker.cluster is not None
    return next(n for n in stack.broker.cluster.nodes if n.name == name)


def assert_final_and_once(stack: Stack, ids: list[str], timeout_s: float) -> dict[str, str | None]:
    """Every instance final: ACTIVE with prepare applied once, or FAILED for its own reason (its
    guest never reached through its queue by the deadline) with nothing applied. Nothing lost."""
    wait_until(lambda: all(status(stack, i) in ("ACTIVE", "FAILED") for i in ids), timeout_s, interval_s=0.5,
               message="every instance final")
    records = Records(stack.client())
    final: dict[str, str | None] = {}
    for instance_id in ids:
        record = records.get(instance_id)
        assert record is not None
        applied = [int(n) for n in journal(stack, instance_id).get("applied", {}).values()]
        if record.status is Status.ACTIVE:
            assert applied == [1], f"{instance_id}: prepare applied {applied}"
        else:
            assert record.reason == Reason.GUEST_UNREACHABLE, (instance_id, record.reason, record.get("error"))
            assert not applied, f"{instance_id} failed, yet applied {applied}"
        final[instance_id] = record.status.value
    return final


def test_killing_the_node_that_leads_the_guest_queues_mid_wave_loses_nothing(cluster: Stack) -> None:
    ids = [f"wave-{n}" for n in range(WAVE)]
    for instance_id in ids:
        out = cluster.cli("provision", instance_id, "--datastore", "noop", "--config", "prepare_seconds=1.0",
                          "--ping-deadline", "60", "--prepare-deadline", "60")
        assert out.returncode == 0, out.stdout + out.stderr
    # Mid-wave: some guests are preparing. Kill the node that leads most of their queues.
    wait_until(lambda: sum(bool(journal(cluster, i).get("deliveries")) for i in ids) >= 2, 90,
               message="prepares under way")
    leaders = [q.get("leader") for q in api(cluster).call("GET", "/api/queues?columns=name,leader,type") or []
               if str(q.get("name", "")).startswith("guest.wave-") and q.get("type") == "quorum"]
    assert leaders, "guest queues are quorum queues with a leader"
    leader = max(set(leaders), key=leaders.count)
    victim = node_named(cluster, str(leader))
    victim.kill()
    try:
        final = assert_final_and_once(cluster, ids, timeout_s=120)
        # Those already consuming before the kill (and most others) get through.
        assert list(final.values()).count("ACTIVE") >= WAVE - 2, final
        # The queues elected new leaders among the two nodes left.
        survivors = {q.get("leader") for q in api(cluster).call("GET", "/api/queues?columns=name,leader") or []
                     if str(q.get("name", "")).startswith("guest.wave-")}
        assert leader not in survivors
    finally:
        victim.start()
    wait_until(lambda: len(cluster.broker.cluster.running_nodes()) == 3, 60,  # type: ignore[union-attr]
               message="the killed node back in the cluster")


def test_a_minority_node_lost_during_provision_and_delete_cycles_loses_and_leaks_nothing(cluster: Stack) -> None:
    assert cluster.broker.cluster is not None
    ids = [f"cyc-{n}" for n in range(4)]
    minority = cluster.broker.cluster.nodes[-1]
    applied: dict[str, list[int]] = {}
    for n, instance_id in enumerate(ids):
        if n == 1:
            minority.kill()
        out = cluster.cli("provision", instance_id, "--datastore", "noop", "--config", "prepare_seconds=0.3",
                          "--wait", timeout_s=150)
        assert out.returncode == 0, out.stdout + out.stderr
        # The guest's journal, read before delete wipes its disk.
        applied[instance_id] = [int(v) for v in journal(cluster, instance_id).get("applied", {}).values()]
        deleted = cluster.cli("delete", instance_id, "--wait", timeout_s=150)
        assert deleted.returncode == 0, deleted.stdout + deleted.stderr
        if n == 2:
            minority.start()
    assert applied == {i: [1] for i in ids}, "each prepare applied once"
    assert all(status(cluster, i) == Status.DELETED.value for i in ids)
    # Nothing of a deleted instance is left on the cluster: no queue, no user.
    deadline = time.monotonic() + 30
    leftovers: list[str] = []
    while time.monotonic() < deadline:
        management = api(cluster)
        leftovers = management.queue_names("guest.cyc-")
        leftovers += [u for u in management.user_names() if u.startswith("guest.cyc-")]
        if not leftovers:
            break
        time.sleep(0.5)
    assert leftovers == []
    wait_until(lambda: len(cluster.broker.cluster.running_nodes()) == 3, 60,  # type: ignore[union-attr]
               message="the killed node back in the cluster")


def test_the_cluster_fixture_is_three_joined_nodes(cluster: Stack, tmp_path: Path) -> None:
    assert cluster.broker.cluster is not None
    running = cluster.broker.cluster.running_nodes()
    assert sorted(running) == sorted(n.name for n in cluster.broker.cluster.nodes)
    assert cluster.env["BERTH_QUEUE_TYPE"] == "quorum"
