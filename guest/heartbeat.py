"""The guest's heartbeat: every ``berth_heartbeat_interval_s`` it reports its datastore's status.

A report goes to the guest's own list ``berth:heartbeat:ID`` (its broker user may write no other),
signed with its key, numbered so the taskmanager can tell an old report from a new one:
``seq`` is microseconds since the epoch, and never below the last one sent plus one (kept on the
guest's disk), so it grows across restarts of the agent, even when its clock was set back. A
guest reports only once prepare has been applied (before that it is not ACTIVE and there is
nothing to report); a frozen guest reports nothing, which is the point. The taskmanager's side is tasks/heartbeats.py.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from berth import __version__
from berth.config import store_url
from berth.ids import heartbeat_key
from berth.paths import guest_dir, replace_file
from berth.steps import ThreadStep
from berth.tls import redis_from_url
from guest.identity import identity
from guest.state import datastore_status

log = logging.getLogger("berth.guest.heartbeat")
# As tasks/heartbeats.KEEP_REPORTS: the newest reports stay when no taskmanager takes them.
KEEP_REPORTS = 16
# After prepare or a restart, the next report goes this soon (the taskmanager makes the instance
# ACTIVE in the meantime), not a whole interval later.
SOON_S = 1.0
_wake = threading.Event()


def soon() -> None:
    """Report within SOON_S instead of at the next interval (the datastore just changed)."""
    timer = threading.Timer(SOON_S, _wake.set)
    timer.daemon = True
    timer.start()


class Reporter:
    def __init__(self, instance_id: str, broker_url: str) -> None:
        self.instance_id = instance_id
        self.client = redis_from_url(broker_url, decode_responses=True, socket_connect_timeout=2.0,
                                           socket_timeout=5.0)
        # The last number sent, kept on the guest's disk: a clock set back (NTP after a VM boots)
        # must not make every report of a restarted agent look older than the last one.
        self.seq_file = guest_dir(instance_id) / "heartbeat.seq"
        try:
            self.last_seq = int(self.seq_file.read_text())
        except (OSError, ValueError):
            self.last_seq = 0

    def next_seq(self) -> int:
        self.last_seq = max(self.last_seq + 1, time.time_ns() // 1000)
        replace_file(self.seq_file, str(self.last_seq), mode=0o600)
        return self.last_seq

    def report(self) -> dict[str, Any] | None:
        """This guest's report now, or None before prepare was applied."""
        status = datastore_status(self.instance_id)
        if status is None:
            return None
        return {"instance_id": self.instance_id, "seq": self.next_seq(), "sent_at": time.time(),
                "version": __version__, "datastore": status.get("datastore"),
                "datastore_status": str(status.get("status"))}

    def send(self, report: dict[str, Any]) -> None:
        envelope = json.dumps({"report": report, "mac": identity().key.report_mac(report)})
        key = heartbeat_key(self.instance_id)
        # One round trip, no MULTI/EXEC: two commands instead of four per report (10,000 idle guests
        # send them every interval). A taskmanager taking the list in between leaves LTRIM nothing to cut.
        with self.client.pipeline(transaction=False) as pipe:
            pipe.rpush(key, envelope)
            pipe.ltrim(key, -KEEP_REPORTS, -1)
            pipe.execute()

    def beat(self) -> dict[str, Any] | None:
        report = self.report()
        if report is not None:
            self.send(report)
        return report


class Heartbeat(ThreadStep):
    """Worker step: the reporting thread, once the guest is bound to its queue."""

    requires = ("guest:BindGuestQueue",)
    thread_name = "berth-heartbeat"

    def start(self, worker: Any) -> None:
        conf = worker.app.conf
        if not conf.berth_instance_id:
            return
        reporter = Reporter(conf.berth_instance_id, store_url(conf.broker_url, conf.result_backend))
        interval = float(conf.berth_heartbeat_interval_s)

        def run() -> None:
            failing = False
            while True:
                try:
                    reporter.beat()
                    if failing:
                        log.info("heartbeats reach the broker again")
                    failing = False
                except Exception as exc:  # noqa: BLE001 - a lost broker must not stop the heartbeat
                    if not failing:
                        log.warning("heartbeat not sent (%s: %s); retrying every %g s", type(exc).__name__,
                                    exc, interval)
                    failing = True
                _wake.wait(interval)
                _wake.clear()
                if self.stopping.is_set():
                    return

        self.run_thread(run)

    def stop(self, worker: Any) -> None:
        super().stop(worker)
        _wake.set()
