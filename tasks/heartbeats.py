"""Guest heartbeats: each ACTIVE guest reports its datastore's status; silence makes it UNKNOWN.

The path keeps the isolation (berth/brokers/redis/acl.py): a guest appends signed reports to its own
list ``berth:heartbeat:ID``, the only list of the kind its broker user may touch, so it can only
ever report for itself, and the taskmanager also checks each report's signature with that
guest's key. Each taskmanager node, every ``berth_heartbeat_check_s``:

- takes every watched guest's reports at once (MULTI: LRANGE + DEL, so each report is applied
  by one node) and applies them in order of their sequence number. A report whose number is not
  above the last one applied is out of order (a frozen guest's old report, say) and changes
  nothing. ``running`` makes the instance ACTIVE, anything else SHUTDOWN.
- marks UNKNOWN every ACTIVE or SHUTDOWN instance not heard from for ``berth_heartbeat_expiry_s``
  (counted on the broker's clock, TIME, from its last report or from when it became ACTIVE).

A guest's list holds whatever that guest pushed: the reports are taken with their size checked
on the broker (a report over ``MAX_REPORT_BYTES`` is never sent here, only its length), and
each guest's reports are parsed, checked and applied on their own, so one guest's garbage (not
UTF-8, nested, huge, the list made a hash) is refused for that guest alone, in one warning a
minute, and never stops the round for the others or the expiry pass.

Both are compare-and-set Lua calls on the record: two nodes, or a delete under way, never
fight over a status. Watched instances are the members of ``berth:heartbeat-index``, scored by
when they were last heard from.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

from berth.config import store_url
from berth.errors import Malformed
from berth.ids import HEARTBEAT_INDEX_KEY, RECORD_INDEX_KEY, heartbeat_key, record_key
from berth.keys import guest_key
from berth.records import SERVING, Records, log_transition, text
from berth.steps import ThreadStep
from berth.tls import redis_from_url
from berth.untrusted import (
    MAX_REPORT_BYTES,
    RateLimitedLog,
    decode_json,
    describe_oversized,
    one_line,
    take_lists,
)

log = logging.getLogger("berth.heartbeats")
# Reports a guest keeps on its list while no taskmanager takes them (guest/heartbeat.py).
KEEP_REPORTS = 16

def watch(client: redis.Redis, instance_id: str, now: float, only_new: bool = False) -> None:
    """Watch the heartbeats of a newly ACTIVE instance; its silence counts from ``now``.

    ``only_new``: leave an instance already watched as it is (a step run again).
    """
    client.zadd(HEARTBEAT_INDEX_KEY, {instance_id: now}, nx=only_new)


def adopt_serving(client: redis.Redis, now: float) -> list[str]:
    """Watch every ACTIVE, SHUTDOWN or UNKNOWN instance that is not watched yet; their ids.

    Each taskmanager node runs this when it starts: instances made ACTIVE by a run that died
    before it could watch them, or before heartbeats existed, are watched from now on.
    """
    ids = [text(raw) for raw in client.zrange(RECORD_INDEX_KEY, 0, -1)]
    with client.pipeline(transaction=False) as pipe:
        for instance_id in ids:
            pipe.hget(record_key(instance_id), "status")
            pipe.zscore(HEARTBEAT_INDEX_KEY, instance_id)
        found = pipe.execute()
    adopted = [iid for iid, status, score in zip(ids, found[::2], found[1::2], strict=True)
               if score is None and status is not None and text(status) in {s.value for s in SERVING}]
    for instance_id in adopted:
        watch(client, instance_id, now, only_new=True)
    if adopted:
        log.warning("watching the heartbeats of %d instance(s) nobody watched: %s", len(adopted), ", ".join(adopted))
    return adopted


def forget(client: redis.Redis, instance_id: str) -> None:
    """Stop watching (delete); the guest's list goes with the instance's other keys."""
    client.zrem(HEARTBEAT_INDEX_KEY, instance_id)


def age_s(record: Any, now: float | None = None) -> float | None:
    """Seconds since the instance's guest last reported, on the taskmanager's clock; None if never."""
    last = record.get("last_heartbeat_at")
    return None if last is None else max(0.0, (time.time() if now is None else now) - float(last))


def stale(record: Any, stale_after_s: float, now: float | None = None) -> bool:
    """True when the guest has not reported for stale_after_s (or never did since ACTIVE)."""
    now = time.time() if now is None else now
    heard = record.get("last_heartbeat_at") or record.get("active_at") or 0.0
    return now - float(heard) >= stale_after_s


# What a report may say of its datastore (guest/datastores); anything else is refused.
DATASTORE_STATES = frozenset({"running", "down", "stopped", "not prepared"})
# A report is an object holding an object: nothing nests deeper.
MAX_REPORT_DEPTH = 3
_complaints = RateLimitedLog(log)

def parse_report(instance_id: str, request_id: str, raw: bytes | int) -> dict[str, Any]:
    """The report if it is well formed, for this instance and signed with its guest's key; else Malformed."""
    if isinstance(raw, int):
        raise Malformed(describe_oversized(raw, "a report", MAX_REPORT_BYTES))
    envelope = decode_json(raw, "report", MAX_REPORT_BYTES, MAX_REPORT_DEPTH)
    if not isinstance(envelope, dict) or not isinstance(envelope.get("report"), dict):
        raise Malformed("a report is not an object holding a report")
    report, mac = envelope["report"], envelope.get("mac")
    if report.get("instance_id") != instance_id:
        raise Malformed("a report is for another instance")
    seq = report.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 2**62:
        raise Malformed("a report's seq is not a number")
    if report.get("datastore_status") not in DATASTORE_STATES:
        raise Malformed("a report's datastore_status is not one of " + ", ".join(sorted(DATASTORE_STATES)))
    try:
        signed = isinstance(mac, str) and guest_key(instance_id, request_id).verify_report(report, mac)
    except (ValueError, TypeError):
        signed = False
    if not signed:
        raise Malformed("a report is not signed with its guest's key")
    return dict(report)


class Monitor:
    """Applies reports and expiries; one per taskmanager node (`HeartbeatMonitor`)."""

    def __init__(self, client: redis.Redis, expiry_s: float) -> None:
        """``client`` returns bytes: the reports are a guest's (its replies are read with `text`)."""
        self.client, self.expiry_s = client, expiry_s
        self.records = Records(client)

    def check(self) -> dict[str, int]:
        """One round: every report taken and applied, every silent guest marked UNKNOWN."""
        counts = {"applied": 0, "out_of_order": 0, "refused": 0, "changed": 0, "expired": 0}
        watched = [text(m) for m in self.client.zrange(HEARTBEAT_INDEX_KEY, 0, -1)]
        if watched:
            self._take_reports(watched, counts)
        seconds, micros = self.client.time()
        broker_now = float(seconds) + float(micros) / 1e6
        for raw in self.client.zrange(HEARTBEAT_INDEX_KEY, "-inf", broker_now - self.expiry_s, byscore=True):
            self._each(text(raw), self._expire_one, counts)
        return counts

    def _each(self, instance_id: str, work: Any, *args: Any) -> None:
        """``work(instance_id, *args)``; a failure other than the broker's is this instance's alone."""
        try:
            work(instance_id, *args)
        except redis.RedisError:
            raise
        except Exception as exc:  # noqa: BLE001 - one instance never stops the round for the others
            _complaints.warn(instance_id, "instance %s: heartbeat round failed for it (%s: %s)", instance_id,
                             type(exc).__name__, one_line(exc, 200))

    def _expire_one(self, instance_id: str, counts: dict[str, int]) -> None:
        outcome, old, since, heard, stamp = self.records.expire_silent(instance_id, self.expiry_s)
        if outcome == "changed":
            counts["expired"] += 1
            now = float(stamp)
            log_transition(instance_id, old, "UNKNOWN", "heartbeat",
                           {"error": f"no heartbeat for {now - float(heard):.1f} s"}, duration_s=_duration(since, now),
                           client=self.client)

    def _take_reports(self, watched: list[str], counts: dict[str, int]) -> None:
        # The newest only: a guest that pushes more than it should costs nothing more.
        taken = take_lists(self.client, [heartbeat_key(i) for i in watched], -KEEP_REPORTS, -1, MAX_REPORT_BYTES,
                           delete=True)
        pending = [(iid, reports) for iid, reports in zip(watched, taken, strict=True) if reports]
        if not pending:
            return
        with self.client.pipeline(transaction=False) as pipe:
            for instance_id, _ in pending:
                pipe.hget(record_key(instance_id), "request_id")
            request_ids = pipe.execute()
        for (instance_id, reports), request_id in zip(pending, request_ids, strict=True):
            if request_id is not None:
                self._each(instance_id, self._apply_reports, text(request_id), reports, counts)

    def _apply_reports(self, instance_id: str, request_id: str, reports: list[Any], counts: dict[str, int]) -> None:
        """One guest's reports: its garbage is refused here, and only its own."""
        parsed = []
        for raw in reports:
            try:
                parsed.append(parse_report(instance_id, request_id, raw))
            except Malformed as exc:
                counts["refused"] += 1
                _complaints.warn(instance_id, "instance %s: refused a heartbeat: %s", instance_id, exc)
        for report in sorted(parsed, key=lambda p: int(p["seq"])):
            self.apply(instance_id, report, counts)

    def apply(self, instance_id: str, report: dict[str, Any], counts: dict[str, int] | None = None) -> str:
        """Apply one checked report; return the outcome (applied, changed, out_of_order, not_serving)."""
        status = "running" if report["datastore_status"] == "running" else "down"
        outcome, old, since, stamp = self.records.apply_heartbeat(instance_id, int(report["seq"]), status)
        now = float(stamp)
        if counts is not None and outcome in counts:
            counts[outcome] += 1
        if outcome == "out_of_order":
            log.info("instance %s: ignored an out-of-order heartbeat (seq %s)", instance_id, report["seq"])
        elif outcome == "changed":
            if counts is not None:
                counts["applied"] += 1
            new = "ACTIVE" if status == "running" else "SHUTDOWN"
            detail = {} if new == "ACTIVE" else {"error": f"guest reports its datastore {report['datastore_status']}"}
            log_transition(instance_id, old, new, "heartbeat", detail, duration_s=_duration(since, now),
                           client=self.client)
        return outcome


def _duration(since: str, now: float) -> float | None:
    try:
        return max(0.0, now - float(since))
    except ValueError:
        return None


class HeartbeatMonitor(ThreadStep):
    """Worker step: a daemon thread that runs `Monitor.check` every ``berth_heartbeat_check_s``."""

    requires = ("tasks.nodes:OwnUnacked",)
    thread_name = "berth-heartbeats"

    def start(self, worker: Any) -> None:
        conf = worker.app.conf
        # Bytes, not text: the heartbeat lists hold whatever their guests pushed.
        client = redis_from_url(store_url(conf.broker_url, conf.result_backend), socket_connect_timeout=2.0,
                                      socket_timeout=10.0)
        monitor = Monitor(client, float(conf.berth_heartbeat_expiry_s))
        period = float(conf.berth_heartbeat_check_s)

        def run() -> None:
            adopted = False
            while not self.stopping.wait(period):
                try:
                    if not adopted:
                        adopt_serving(client, time.time())
                        adopted = True
                    monitor.check()
                except redis.RedisError as exc:
                    log.warning("heartbeat check failed (broker: %s); retrying", exc)
                except Exception:  # noqa: BLE001 - the thread must outlive any one failure
                    log.exception("heartbeat check failed; retrying")

        self.run_thread(run)
