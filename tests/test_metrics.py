"""Metrics and logs for operators: Berth's series on Flower's /metrics, structured log lines.

Real processes (the session taskmanager, Flowers of their own) and real Redis throughout. The
session broker is shared with the tests running alongside, so series on it are compared as
"increased by at least"; exact values are checked on a Redis database of this module's own.
"""

from __future__ import annotations

import base64
import logging
import math
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from berth import metrics
from berth.ids import PROVISION_STEPS as CHAIN_STEPS
from berth.ids import RECORD_INDEX_KEY, STEP_HISTOGRAM_KEY, STEPS, TRANSITIONS_KEY, record_key, step_task_id
from berth.logs import parse_structured
from berth.records import Records, Status, log_transition
from berth.redis_server import free_port
from tasks import app
from tasks.runtime import redis_client
from tasks.taskmanager import validated
from tests.helpers import FLOWER_AUTH, FlowerClient, Proc, start_flower, wait_for_status, wait_until

pytestmark = pytest.mark.usefixtures("taskmanager")
AUTH = FLOWER_AUTH
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, by name and labels."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def get(url: str, auth: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), ""


def scrape(base: str) -> tuple[str, Samples]:
    """/metrics without credentials: always served (Flower's own endpoint)."""
    status, text = get(base + "/metrics")
    assert status == 200
    return text, parse(text)


def step_counts(samples: Samples) -> dict[str, float]:
    return {step: value(samples, "berth_step_duration_seconds_count", step=step) for step in STEPS}


def provision(instance_id: str, records: Records) -> None:
    from workflows import submit

    submit(instance_id, datastore="noop")
    assert wait_for_status(records, instance_id, [Status.ACTIVE]).status is Status.ACTIVE


def test_flower_serves_berth_series_next_to_its_own_without_auth(
        flower: FlowerClient, new_id: Callable[[str], str], records: Records) -> None:
    _, before = scrape(flower.base)
    provision(new_id("met"), records)
    # verify's duration is observed once its task has returned, just after the instance is ACTIVE.
    wait_until(lambda: all(step_counts(scrape(flower.base)[1])[s] >= step_counts(before)[s] + 1 for s in CHAIN_STEPS),
               20, interval_s=0.1, message="the five steps observed")
    text, first = scrape(flower.base)
    assert get(flower.base + "/api/workers")[0] == 401, "Flower's API still asks for a password"
    assert "flower_" in text and "flower_events_total" in text, "Flower's own series are there too"
    assert value(first, "berth_up") == 1
    for status in Status:
        assert ("berth_instances", (("status", status.value),)) in first, f"berth_instances{{status={status}}}"
    assert value(first, "berth_instances", status="ACTIVE") >= 1
    assert value(first, "berth_step_duration_seconds_count", step="ping_guest") >= 1
    for step in STEPS:
        buckets = [value(first, "berth_step_duration_seconds_bucket", step=step, le=le) for le in metrics.BUCKET_LABELS]
        assert buckets == sorted(buckets), f"{step}: cumulative buckets"
        assert buckets[-1] == value(first, "berth_step_duration_seconds_count", step=step)
        assert ("berth_step_duration_seconds_sum", (("step", step),)) in first
    assert value(first, "berth_step_duration_seconds_bucket", step="ping_guest", le="+Inf") >= 1
    assert value(first, "berth_transitions_total", **{"from": "NEW", "to": "BUILD"}) >= 1
    assert value(first, "berth_transitions_total", **{"from": "BUILD", "to": "ACTIVE"}) >= 1

    provision(new_id("met"), records)
    wait_until(lambda: all(step_counts(scrape(flower.base)[1])[s] >= step_counts(first)[s] + 1 for s in CHAIN_STEPS),
               20, interval_s=0.1, message="the second provisioning's steps observed")
    _, second = scrape(flower.base)
    for change in (("NEW", "BUILD"), ("BUILD", "ACTIVE")):
        labels = {"from": change[0], "to": change[1]}
        assert value(second, "berth_transitions_total", **labels) >= value(first, "berth_transitions_total",
                                                                            **labels) + 1
    assert value(second, "berth_step_duration_seconds_sum", step="ping_guest") > \
        value(first, "berth_step_duration_seconds_sum", step="ping_guest")
    assert value(second, "berth_instances", status="ACTIVE") >= 1


def own_lines(log_text: str, instance_id: str) -> list[dict[str, Any]]:
    """The structured lines (transition, step) of one instance in a log."""
    found = []
    for line in log_text.splitlines():
        parsed = parse_structured(line) if f'"instance_id": "{instance_id}"' in line else None
        if parsed is not None and parsed.get("instance_id") == instance_id:
            found.append(parsed)
    return found


def is_duration(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def test_the_taskmanager_log_has_one_structured_line_per_transition_and_per_step(
        new_id: Callable[[str], str], records: Records, taskmanager: Proc) -> None:
    from workflows.tasks import delete

    instance_id = new_id("log")
    provision(instance_id, records)

    def lines(event: str) -> list[dict[str, Any]]:
        return [p for p in own_lines(taskmanager.log(), instance_id) if p.get("event") == event]

    wait_until(lambda: {p["step"] for p in lines("step")} >= set(CHAIN_STEPS), 20, message="step lines")
    # The BUILD -> ACTIVE line may come from the taskmanager's main process (tasks/answers.py),
    # a moment after the record changed and after verify's own line.
    wait_until(lambda: len(lines("transition")) >= 2, 20, message="transition lines")
    changes = {(p["from"], p["to"]): p for p in lines("transition")}
    assert [(p["from"], p["to"]) for p in lines("transition")] == [("NEW", "BUILD"), ("BUILD", "ACTIVE")], \
        "exactly one line per change"
    assert changes["NEW", "BUILD"]["step"] == "create_queue"
    assert changes["BUILD", "ACTIVE"]["step"] == "verify"
    for line in changes.values():
        assert is_duration(line["duration_s"]), line
    steps = {p["step"]: p for p in lines("step")}
    assert len(lines("step")) == len(CHAIN_STEPS), "one line per step of the chain"
    for step in CHAIN_STEPS:
        assert is_duration(steps[step]["duration_s"]) and isinstance(steps[step]["retries"], int), steps[step]
    record = records.get(instance_id)
    assert record is not None and record["status_changed_at"] >= record["created_at"]
    assert record["ping_guest_started_at"] <= record["ping_guest_finished_at"]
    # The human part of the line comes first, the JSON object after it.
    text = next(x for x in taskmanager.log().splitlines()
                if f"instance {instance_id}: BUILD -> ACTIVE (step=verify) {{" in x)
    assert '"event": "transition"' in text

    # Delete, run by the taskmanager (workflows.delete marks it DELETING there).
    delete.apply_async(args=[instance_id])
    wait_for_status(records, instance_id, [Status.DELETED])
    wait_until(lambda: {p["step"] for p in lines("step")} >= {"shutdown_guest", "remove_instance"}, 20,
               message="delete step lines")
    changes = {(p["from"], p["to"]): p for p in lines("transition")}
    assert changes["ACTIVE", "DELETING"]["step"] == "delete"
    assert changes["DELETING", "DELETED"]["step"] == "remove_instance"
    assert all(is_duration(p["duration_s"]) for p in changes.values())


@pytest.fixture
def private_db() -> Iterator[redis.Redis]:
    """An empty Redis database of this test's own on the session's server: metrics keys nobody else
    writes (never the broker's or the result backend's database, never one holding anything)."""
    used = {redis.Redis.from_url(url).get_connection_kwargs().get("db", 0)
            for url in (app.conf.broker_url, app.conf.result_backend)}
    base = app.conf.broker_url.rsplit("/", 1)[0]
    for db in (n for n in range(9, 16) if n not in used):
        client = redis.Redis.from_url(f"{base}/{db}", decode_responses=True)
        if client.dbsize() == 0:
            break
        client.close()
    else:
        pytest.skip("no empty Redis database for the exact metrics checks")
    yield client
    client.delete(STEP_HISTOGRAM_KEY, TRANSITIONS_KEY, RECORD_INDEX_KEY,
                  *(record_key(i) for i in ("mx-1", "mx-2", "mx-3")))
    client.close()


def exported(client: redis.Redis) -> Samples:
    registry = CollectorRegistry()
    registry.register(metrics.BerthCollector(lambda: client))
    return parse(generate_latest(registry).decode())


def test_transitions_are_logged_counted_and_timed(private_db: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    records = Records(private_db)
    request = validated("mx-1", datastore="noop")
    assert records.create(request, request_id="req-1", now=1000.0)
    caplog.set_level(logging.INFO, logger="berth.records")
    assert records.transition("mx-1", Status.BUILD, [Status.NEW], "create_queue")
    assert not records.transition("mx-1", Status.ACTIVE, [Status.NEW], "verify"), "refused: not logged, not counted"
    assert records.transition("mx-1", Status.FAILED, [Status.BUILD], "ping_guest", reason="GUEST_UNREACHABLE",
                              error="no answer to 3 ping(s) within 1 s")
    lines = [parse_structured(r.getMessage()) for r in caplog.records if r.name == "berth.records"]
    assert [(p["from"], p["to"], p["step"]) for p in lines if p] == [
        ("NEW", "BUILD", "create_queue"), ("BUILD", "FAILED", "ping_guest")]
    new_build, build_failed = (p for p in lines if p)
    assert new_build["duration_s"] > 1000, "from created_at (1000.0, long ago)"
    assert 0 <= build_failed["duration_s"] < 5, "from the previous change"
    assert build_failed["reason"] == "GUEST_UNREACHABLE" and "3 ping(s)" in build_failed["error"]
    assert "reason" not in new_build
    assert private_db.hgetall(TRANSITIONS_KEY) == {"NEW|BUILD": "1", "BUILD|FAILED": "1"}

    # A writer of its own (the heartbeats) logs and counts through log_transition.
    log_transition("mx-1", "ACTIVE", "UNKNOWN", "heartbeat", {"error": "no heartbeat for 31.0 s"},
                   duration_s=31.25, client=private_db)
    last = parse_structured(caplog.records[-1].getMessage())
    assert last == {"event": "transition", "instance_id": "mx-1", "from": "ACTIVE", "to": "UNKNOWN",
                    "step": "heartbeat", "duration_s": 31.25, "error": "no heartbeat for 31.0 s"}
    assert caplog.records[-1].getMessage().startswith("instance mx-1: ACTIVE -> UNKNOWN (step=heartbeat) {")
    samples = exported(private_db)
    assert value(samples, "berth_transitions_total", **{"from": "ACTIVE", "to": "UNKNOWN"}) == 1
    assert value(samples, "berth_instances", status="FAILED") == 1
    assert sum(value(samples, "berth_instances", status=s.value) for s in Status) == 1

    # Metrics in a bad state never fail a transition (the count is best effort).
    private_db.delete(TRANSITIONS_KEY)
    private_db.set(TRANSITIONS_KEY, "not a hash")
    assert records.create(validated("mx-2", datastore="noop"), request_id="req-2")
    assert records.transition("mx-2", Status.BUILD, [Status.NEW], "create_queue")
    log_transition("mx-2", "BUILD", "ACTIVE", "test", {}, client=private_db)
    after = records.get("mx-2")
    assert after is not None and after.status is Status.BUILD
    assert value(exported(private_db), "berth_up") == 0, "unreadable metrics: berth_up 0, the scrape goes on"


def test_a_step_is_observed_once_from_its_first_run_and_only_for_its_own_chain(
        private_db: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    records = Records(private_db)
    assert records.create(validated("mx-3", datastore="noop"), request_id="req-3", now=50.0)
    own = step_task_id("mx-3", "req-3", "ping_guest")
    assert not metrics.step_started(records, "mx-3", "ping_guest", "stray-call", now=100.0)
    assert metrics.step_started(records, "mx-3", "ping_guest", own, now=100.0)
    assert metrics.step_started(records, "mx-3", "ping_guest", own, now=101.0), "a retry: the first run counts"
    assert metrics.step_succeeded(records, "mx-3", "ping_guest", "stray-call", now=102.0) is None
    caplog.set_level(logging.INFO, logger="berth.metrics")
    assert metrics.step_succeeded(records, "mx-3", "ping_guest", own, retries=6, now=102.5) == 2.5
    assert metrics.step_succeeded(records, "mx-3", "ping_guest", own, now=103.0) is None, "observed once"
    assert parse_structured(caplog.records[-1].getMessage()) == {
        "event": "step", "instance_id": "mx-3", "step": "ping_guest", "duration_s": 2.5, "retries": 6}
    # create_queue's first run comes before its record: it counts from the record's creation.
    assert metrics.step_succeeded(records, "mx-3", "create_queue", step_task_id("mx-3", "req-3", "create_queue"),
                                  now=50.25) == 0.25
    # A delete step belongs to the delete request.
    records.update("mx-3", delete_request_id="del-3")
    shutdown = step_task_id("mx-3", "del-3", "shutdown_guest")
    assert metrics.step_started(records, "mx-3", "shutdown_guest", shutdown, now=200.0)
    assert metrics.step_succeeded(records, "mx-3", "shutdown_guest", shutdown, now=200.004) is not None
    # No record, no observation (and nothing written where there was no record).
    assert metrics.step_succeeded(records, "gone-1", "verify", step_task_id("gone-1", "r", "verify")) is None
    assert not private_db.exists(record_key("gone-1"))

    samples = exported(private_db)
    assert value(samples, "berth_step_duration_seconds_count", step="ping_guest") == 1
    assert value(samples, "berth_step_duration_seconds_sum", step="ping_guest") == 2.5
    assert value(samples, "berth_step_duration_seconds_bucket", step="ping_guest", le="2.5") == 1
    assert value(samples, "berth_step_duration_seconds_bucket", step="ping_guest", le="1.0") == 0
    assert value(samples, "berth_step_duration_seconds_bucket", step="shutdown_guest", le="0.005") == 1
    assert value(samples, "berth_step_duration_seconds_count", step="verify") == 0, "every step exported, 0 too"
    assert value(samples, "berth_instances", status="NEW") == 1


def test_registering_twice_does_not_raise_and_a_dead_redis_does_not_break_a_scrape(
        monkeypatch: pytest.MonkeyPatch) -> None:
    registry = CollectorRegistry()
    assert metrics.register(redis_client, registry) is metrics.register(redis_client, registry)
    # flowerconfig.py, executed twice in one process (as Flower executes it, with exec).
    monkeypatch.setenv("FLOWER_BASIC_AUTH", AUTH)
    source = Path(__file__).parent.parent.joinpath("flowerconfig.py").read_text()
    for _ in range(2):
        exec(compile(source, "flowerconfig.py", "exec"), {"__file__": "flowerconfig.py"})  # noqa: S102
    dead = redis.Redis(port=free_port(), socket_connect_timeout=1)
    registry = CollectorRegistry()
    registry.register(metrics.BerthCollector(lambda: dead))
    assert parse(generate_latest(registry).decode()) == {("berth_up", ()): 0.0}


def test_flower_with_its_broker_down_still_serves_metrics(tmp_path: Path) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    proc, base = start_flower(tmp_path / "flower.log", AUTH, CELERY_BROKER_URL=down, CELERY_RESULT_BACKEND=down,
                              BERTH_HOME=str(tmp_path / "home"))
    try:
        _, samples = scrape(base)
        assert value(samples, "berth_up") == 0
        assert not [name for name, _ in samples if name.startswith("berth_") and name != "berth_up"]
    finally:
        proc.stop()
