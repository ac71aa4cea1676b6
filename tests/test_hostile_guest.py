"""The hostile-guest harness: one guest's credentials and key, garbage everywhere it may write, and
every other instance lives on exactly as it would without it.

A private stack (broker, taskmanager, local guests) with fast heartbeats. The attacker holds only
what `guest-env` gives its own guest. For a bounded time and count it writes hypothesis-generated
garbage (any bytes, sizes up to the limits and past them, deep nesting, wrong types, control
characters, forged result documents, lists made hashes) into every key and channel its ACL
allows, and holds a few dozen connections, while the others provision, heartbeat, answer the
guest API, freeze and get deleted. Then: the frozen victim went UNKNOWN within the expiry plus one
check interval, the live one never did, every taskmanager thread still runs, the attacker's own
delete completes and leaves no key in any database, and no command printed a control character.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from typing import Any

import redis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from berth.ids import guest_task_prefix
from berth.records import Records, Status
from tests.helpers import celery, wait_for_status, wait_until
from tests.hostile import HostileGuest, keys_naming, printable, result_document

EXPIRY_S, CHECK_S = 4.0, 0.5
FAST = {"BERTH_HEARTBEAT_INTERVAL_S": "0.5", "BERTH_HEARTBEAT_EXPIRY_S": str(EXPIRY_S),
        "BERTH_HEARTBEAT_CHECK_S": str(CHECK_S), "BERTH_HEARTBEAT_STALE_S": "2", "BERTH_GUEST_PING_TIMEOUT_S": "5"}
# The attack: at most this long, this many batches of writes, this many extra connections, and
# this many bytes in large values (past it, large ones are cut to just over the report limit): a
# guest can fill the broker's memory, which no Redis ACL bounds (docs/isolation.md).
ATTACK_S, MAX_BATCHES, CONNECTIONS, LARGE_BYTES = 30.0, 3000, 40, 64 * 1024 * 1024
# A round of the monitor itself takes time on a loaded 2-core machine: the allowance for it.
ROUND_S = 1.0

JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                   max_size=3), max_leaves=10)
CONTROL = st.lists(st.sampled_from(["\x1b[2J", "\x1b]0;x\x07", "\r\n", "\u202e", "\x00", "\x9b", "ok"]),
                   max_size=8).map("".join)
PAYLOADS = st.one_of(
    st.binary(max_size=512),
    st.sampled_from([4096, 4097, 256 * 1024 + 1, 1_500_000, 2 * 1024 * 1024 + 1]).map(lambda n: b"x" * n),
    st.integers(1, 5000).map(lambda n: b"[" * n),
    JSONISH.map(lambda v: json.dumps(v).encode()),
    CONTROL.map(lambda t: json.dumps({"report": {"instance_id": t, "seq": 1}, "mac": t}).encode()),
    st.tuples(st.sampled_from(["SUCCESS", "FAILURE", "PENDING", "\x1b"]), JSONISH | CONTROL).map(
        lambda sr: result_document(*sr)),
)
WRITES = ("rpush_heartbeat", "lpush_deadletter", "push_queue", "set_result", "publish", "publish_prepare",
          "unacked", "flip_type")


def _write(guest: HostileGuest, kind: str, payload: bytes, suffix: bytes) -> None:
    """One write of the attacker's, into a place its ACL allows."""
    iid = guest.instance_id
    heartbeat, deadletter = f"berth:heartbeat:{iid}", f"berth:deadletter:{iid}"
    if kind == "rpush_heartbeat":
        guest.broker.rpush(heartbeat, payload)
    elif kind == "lpush_deadletter":
        guest.broker.lpush(deadletter, payload)
    elif kind == "push_queue":
        guest.broker.lpush(guest.list_keys()[len(payload) % 4], payload)
    elif kind == "set_result":
        guest.results.set(guest.result_key(suffix), payload)
    elif kind in ("publish", "publish_prepare"):
        tail = b"prepare." + suffix if kind == "publish_prepare" else suffix
        guest.results.publish(guest.result_key(tail), payload)
    elif kind == "unacked":
        keys = guest.other_keys()
        guest.broker.hset(keys[0], suffix or b"x", payload)
        guest.broker.set(keys[2], payload)
    else:
        key = (heartbeat, deadletter, *guest.list_keys()[:4])[len(suffix) % 6]
        guest.broker.delete(key)
        guest.broker.hset(key, b"x", payload)


class Attack:
    """The flood, in a thread: bounded in time and count; what it did is counted."""

    def __init__(self, guest: HostileGuest) -> None:
        self.guest, self.stop_at = guest, time.monotonic() + ATTACK_S
        self.writes, self.refused, self.batches, self.large = 0, 0, 0, 0
        self.thread = threading.Thread(target=self.run, name="attack", daemon=True)

    def run(self) -> None:
        @settings(max_examples=200, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(st.lists(st.tuples(st.sampled_from(WRITES), PAYLOADS, st.binary(max_size=24)), min_size=1,
                        max_size=6))
        def batch(writes: list[tuple[str, bytes, bytes]]) -> None:
            if time.monotonic() >= self.stop_at or self.batches >= MAX_BATCHES:
                return
            self.batches += 1
            for kind, payload, suffix in writes:
                if len(payload) > 4097:
                    self.large += len(payload)
                    payload = payload if self.large <= LARGE_BYTES else payload[:4097]
                try:
                    _write(self.guest, kind, payload, suffix)
                    self.writes += 1
                except redis.RedisError:
                    self.refused += 1  # over the broker's value limit, a WRONGTYPE of its own making

        while time.monotonic() < self.stop_at and self.batches < MAX_BATCHES:
            batch()

    def start(self) -> None:
        self.thread.start()

    def join(self) -> None:
        self.thread.join(timeout=ATTACK_S + 30)
        assert not self.thread.is_alive(), "the attack did not stop by itself"




def test_a_hostile_guest_harms_nobody_else(stack: Any) -> None:
    taskmanager = stack.start_taskmanager(**FAST)
    printed: list[str] = []

    def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        out: subprocess.CompletedProcess[str] = stack.cli(*args, timeout_s=120)
        printed.append(out.stdout + out.stderr)
        assert out.returncode == 0 or not ok, out.stdout + out.stderr
        return out

    for instance_id in ("evil", "live", "frozen", "doomed"):
        printed.append(stack.provision(instance_id).stdout)
    api = stack.provision("api", "--datastore", "redis", "--user", "app:app-pass-123", "--database", "app")
    printed.append(api.stdout)
    records = Records(stack.client())

    def heard(instance_id: str) -> bool:
        record = records.get(instance_id)
        return record is not None and record.get("heartbeats", 0) >= 1

    for instance_id in ("live", "frozen"):
        wait_until(lambda i=instance_id: heard(i), 15, message=f"a heartbeat of {instance_id}")  # type: ignore[misc]
    guest = HostileGuest(stack.guest_env("evil"))
    held = [redis.Redis.from_url(guest.env["CELERY_BROKER_URL"]) for _ in range(CONNECTIONS)]
    for connection in held:
        connection.ping()
    frozen_pid = int(stack.guests().pid("frozen"))
    attack = Attack(guest)
    os.kill(frozen_pid, signal.SIGSTOP)
    try:
        attack.start()
        live_seen: set[str] = set()

        def frozen_unknown() -> bool:
            live_seen.add(records.get("live").status.value)  # type: ignore[union-attr]
            return records.get("frozen").status is Status.UNKNOWN  # type: ignore[union-attr]

        wait_until(frozen_unknown, EXPIRY_S + 20, interval_s=0.1, message="frozen guest UNKNOWN")
        # The others provision, answer the guest API and get deleted while the attack goes on.
        cli("provision", "late", "--wait")
        users = cli("users", "api")
        assert json.loads(cli("status", "api").stdout)["datastore"]["status"] == "running"
        assert json.loads(users.stdout) == [{"name": "app", "databases": ["app"]}]
        cli("delete", "doomed", "--wait")
        while attack.thread.is_alive():
            live_seen.add(records.get("live").status.value)  # type: ignore[union-attr]
            time.sleep(0.1)
        attack.join()
    finally:
        os.kill(frozen_pid, signal.SIGCONT)
        for connection in held:
            connection.close()
    assert attack.writes > 100, (attack.writes, attack.refused)

    # The frozen victim: UNKNOWN within the expiry plus one check interval of its last heartbeat.
    frozen = records.get("frozen")
    assert frozen is not None
    late_by = frozen["status_changed_at"] - frozen["last_heartbeat_at"]
    assert EXPIRY_S <= late_by <= EXPIRY_S + CHECK_S + ROUND_S, late_by
    # The live one never left ACTIVE, and nobody else changed but as asked.
    assert live_seen == {"ACTIVE"}, live_seen
    assert "live: ACTIVE ->" not in taskmanager.log()
    assert records.get("late").status is Status.ACTIVE  # type: ignore[union-attr]
    assert records.get("doomed").status is Status.DELETED  # type: ignore[union-attr]
    wait_for_status(records, "frozen", [Status.ACTIVE], timeout_s=20)  # thawed, it reports again

    # Every background thread of the taskmanager still runs.
    inspect = subprocess.run(celery("-A", "tasks", "inspect", "berth_threads", "-j", "-t", "10"), env=stack.env,
                             capture_output=True, text=True, timeout=60)
    [threads] = [reply["threads"] for reply in json.loads(inspect.stdout).values()]
    assert {"berth-heartbeats", "berth-prepare-answers", "berth-node-lease"} <= set(threads), inspect.stdout

    # What the operator reads of the attacker prints no control character.
    cli("show", "evil")
    cli("list")
    cli("dead-letters", "evil")
    cli("ping", "evil", "--timeout", "3", ok=False)
    cli("status", "evil", "--timeout", "3", ok=False)
    # Its own delete completes and leaves nothing behind, in any database, whatever the names' bytes.
    cli("delete", "evil", "--wait")
    assert records.get("evil").status is Status.DELETED  # type: ignore[union-attr]
    assert keys_naming(redis.Redis.from_url(stack.broker.url), "evil") == []
    assert not redis.Redis.from_url(stack.broker.url).scan(match=f"*{guest_task_prefix('evil')}*")[1]
    assert all(printable(text) for text in printed), [t for t in printed if not printable(t)]
    guest.stop()
