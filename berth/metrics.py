"""Metrics for operators: step durations, transition counts and instances by status, in Prometheus form.

Every taskmanager process records into the broker's Redis, so that all of them add up and any
process can export:

- ``berth:metrics:steps`` (hash): a histogram per step of the chains, fields ``<step>|<le>``
  (cumulative bucket counts, ``le`` as Prometheus writes it: ``0.005``, ``1.0``, ``+Inf``),
  ``<step>|sum`` and ``<step>|count``; one observation per step of an instance, from the step's
  first run to its success, retries included (`step_started`, `step_succeeded`);
- ``berth:metrics:transitions`` (hash): fields ``<from>|<to>``, one count per status change
  (`berth.records.Records.transition` counts in its Lua call, `berth.records.log_transition`
  for writers that change a status themselves).

`BerthCollector` reads them, and the statuses of all instance records, at scrape time; Flower
serves it with its own series on ``/metrics`` (registered by ``flowerconfig.py``).
Recording is best effort: callers catch and log its errors, a step or a transition never fails
for a metric.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import redis
from prometheus_client.core import (
    REGISTRY,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from berth.ids import RECORD_INDEX_KEY, STEP_HISTOGRAM_KEY, STEPS, TRANSITIONS_KEY, record_key
from berth.logs import structured
from berth.records import InstanceRecord, Records, Status

log = logging.getLogger("berth.metrics")

# Seconds. ping_guest waits for a booting guest (up to its deadline), hence the long tail.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, math.inf)
BUCKET_LABELS = tuple(floatToGoString(b) for b in BUCKETS)
# Every step of berth.ids.STEPS is exported even before its first observation (a zero
# histogram), so that dashboards and alerts find every series.
# How many instance statuses are read in one pipelined round trip at scrape time.
SCRAPE_CHUNK = 2000

# --- Recording (taskmanager processes) ----------------------------------------------------------

_BOUNDS = [str(b) for b in BUCKETS[:-1]] + ["inf"]


def step_started(records: Records, instance_id: str, step: str, task_id: str, now: float | None = None,
                 *, ran: bool = False) -> InstanceRecord | None:
    """A step of the instance's own chain starts a run: keep the time of its first run.

    Stored as ``<step>_started_at`` on the record (the first run's time survives retries,
    redeliveries and other taskmanager processes). Returns the record as it is then (one read
    the step need not make), or None for a task that is not the
    instance's chain step (a stray call from a shell), or when there is no record yet:
    create_queue's first run, which creates it; its start is the record's ``created_at`` then.
    With ``ran``, also notes that the instance's chain ran a step now (`Records.step_ran`), in the
    same round trip.
    """
    return records.mark_step_started(instance_id, step, task_id, time.time() if now is None else now, ran=ran)


def step_succeeded(records: Records, instance_id: str, step: str, task_id: str, retries: int = 0,
                   now: float | None = None) -> float | None:
    """A step of the instance's own chain succeeded: observe its duration once, log it; return it.

    The duration runs from the step's first run to this success. A second success of the same
    step (a redelivery, a second delete request) observes nothing and returns None, as does a
    stray call. One round trip: the check, the mark and the histogram are one Lua call.
    """
    duration_s = records.mark_step_succeeded(instance_id, step, task_id, time.time() if now is None else now,
                                             _BOUNDS, BUCKET_LABELS)
    if duration_s is None:
        return None
    log.info("%s", structured(f"instance {instance_id}: {step} done in {duration_s:.3f} s (retries={retries})",
                              event="step", instance_id=instance_id, step=step,
                              duration_s=round(duration_s, 4), retries=retries))
    return duration_s


# --- Export (Flower, or any process) ------------------------------------------------------------

def _statuses() -> tuple[str, ...]:
    return tuple(s.value for s in Status)


class BerthCollector(Collector):
    """Berth's series, read from the broker's Redis at every scrape.

    - ``berth_up``: 1 when Berth's data could be read, 0 when not (Redis down: then no other
      ``berth_*`` series, and the scrape still succeeds);
    - ``berth_instances{status}``: instance records by status, every status (0 included);
    - ``berth_step_duration_seconds{step}``: histogram, a step's first run to its success;
    - ``berth_transitions_total{from,to}``: status changes;
    - ``berth_guest_connection_info{instance_id,host,transport}``: 1 for each instance not
      DELETED whose guest's connections the taskmanager saw (when it answered a ping, or at a
      `show`): the address it connects from and ``tls``, ``plain`` or ``mixed``.
    """

    def __init__(self, client: Callable[[], redis.Redis]) -> None:
        self._client = client

    def describe(self) -> Iterable[Metric]:
        # Names only: registering reads no Redis (Flower registers before it connects anywhere).
        return [self._up(1), *self._families(Counter(), {}, {}), self._guests([])]

    def collect(self) -> Iterable[Metric]:
        try:
            client = self._client()
            with client.pipeline(transaction=False) as pipe:
                pipe.zrange(RECORD_INDEX_KEY, 0, -1)
                pipe.hgetall(STEP_HISTOGRAM_KEY)
                pipe.hgetall(TRANSITIONS_KEY)
                ids, steps, transitions = pipe.execute()
            rows = self._read_records(client, ids)
            families = [*self._families(Counter(row[0] for row in rows), steps, transitions), self._guests(rows)]
        except Exception as exc:  # noqa: BLE001 - a scrape must succeed whatever Redis does
            log.warning("berth metrics unavailable: %s: %s", type(exc).__name__, exc)
            return [self._up(0)]
        return [self._up(1), *families]

    @staticmethod
    def _up(value: int) -> Metric:
        return GaugeMetricFamily("berth_up", "1 when Berth's records and metrics could be read from the broker's "
                                             "Redis at this scrape, 0 when not", value=value)

    @staticmethod
    def _read_records(client: redis.Redis, ids: list[Any]) -> list[tuple[str, str, str | None, str | None]]:
        """(status, instance id, guest host, guest transport) of every record."""
        rows = []
        for start in range(0, len(ids), SCRAPE_CHUNK):
            chunk = [_text(raw) for raw in ids[start:start + SCRAPE_CHUNK]]
            with client.pipeline(transaction=False) as pipe:
                for instance_id in chunk:
                    pipe.hmget(record_key(instance_id), "status", "guest_host", "guest_transport")
                # A record that expired (deleted, past its audit time) is simply not counted.
                rows += [(_text(status), instance_id, _maybe(host), _maybe(transport))
                         for instance_id, (status, host, transport) in zip(chunk, pipe.execute(), strict=True)
                         if status is not None]
        return rows

    @staticmethod
    def _guests(rows: list[tuple[str, str, str | None, str | None]]) -> Metric:
        info = GaugeMetricFamily("berth_guest_connection_info", "Where each instance's guest connects to the broker "
                                 "from, and how (tls, plain or mixed), as last seen",
                                 labels=["instance_id", "host", "transport"])
        for status, instance_id, host, transport in rows:
            if host and status != Status.DELETED.value:
                info.add_metric([instance_id, host, transport or "unknown"], 1)
        return info

    def _families(self, statuses: Counter[str], steps: dict[Any, Any],
                  transitions: dict[Any, Any]) -> list[Metric]:
        instances = GaugeMetricFamily("berth_instances", "Instance records by status", labels=["status"])
        for status in _statuses():
            instances.add_metric([status], statuses.get(status, 0))
        durations = HistogramMetricFamily(
            "berth_step_duration_seconds", "Seconds from a chain step's first run to its success, retries included",
            labels=["step"])
        for step, (buckets, total) in histograms(steps).items():
            durations.add_metric([step], buckets, total)
        changes = CounterMetricFamily("berth_transitions", "Instance status changes", labels=["from", "to"])
        for field, value in sorted((_text(k), v) for k, v in transitions.items()):
            old, sep, new = field.partition("|")
            if sep:
                changes.add_metric([old, new], float(value))
        return [instances, durations, changes]


def histograms(raw: dict[Any, Any]) -> dict[str, tuple[list[tuple[str, float]], float]]:
    """The stored histograms as ``{step: ([(le, cumulative count), ...], sum)}``, every known step."""
    fields = {_text(k): float(v) for k, v in raw.items()}
    found = {name.partition("|")[0] for name in fields if "|" in name}
    out = {}
    for step in [*STEPS, *sorted(found - set(STEPS))]:
        buckets, running = [], 0.0
        for label in BUCKET_LABELS:
            # Cumulative by construction (one Lua call per observation); kept monotonic regardless.
            running = max(running, fields.get(f"{step}|{label}", 0.0))
            buckets.append((label, running))
        out[step] = (buckets, fields.get(f"{step}|sum", 0.0))
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _maybe(value: Any) -> str | None:
    return None if value is None else _text(value)


_registered: weakref.WeakKeyDictionary[CollectorRegistry, BerthCollector] = weakref.WeakKeyDictionary()


def register(client: Callable[[], redis.Redis], registry: CollectorRegistry = REGISTRY) -> BerthCollector:
    """Register Berth's collector, reading through ``client`` (once: a second call returns the first)."""
    collector = _registered.get(registry)
    if collector is not None:
        return collector
    collector = BerthCollector(client)
    try:
        registry.register(collector)
    except ValueError as exc:
        # berth_* names taken already: another copy of this module (reloaded) registered them.
        log.warning("berth metrics already registered: %s", exc)
    _registered[registry] = collector
    return collector

