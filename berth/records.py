"""Instance records: one Redis hash per instance, written only by the taskmanager.

Status changes go through `Records.transition`, a compare-and-set in one Lua call, so a
late step can never overwrite a final state (a verify that finds FAILED does not make it
ACTIVE). Every transition is logged with the instance id.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any

import redis

from berth.errors import InstanceExists, RequestFinished
from berth.ids import (
    HEARTBEAT_INDEX_KEY,
    INFLIGHT_KEY,
    RECORD_INDEX_KEY,
    STEP_HISTOGRAM_KEY,
    TRANSITIONS_KEY,
    finished_request_key,
    record_key,
    secrets_key,
)
from berth.logs import transition_line
from berth.spec import ProvisionRequest

log = logging.getLogger("berth.records")


class Status(StrEnum):
    NEW = "NEW"
    BUILD = "BUILD"
    ACTIVE = "ACTIVE"
    FAILED = "FAILED"
    # Delete under way: the chain stops at its next step, the guest is shut down, keys removed.
    DELETING = "DELETING"
    DELETED = "DELETED"
    # After ACTIVE, from the guest's heartbeats (tasks/heartbeats.py): its datastore is down ...
    SHUTDOWN = "SHUTDOWN"
    # ... or its heartbeats stopped for longer than the expiry. A heartbeat again makes it ACTIVE.
    UNKNOWN = "UNKNOWN"


class Reason(StrEnum):
    BOOT_FAILED = "BOOT_FAILED"
    GUEST_UNREACHABLE = "GUEST_UNREACHABLE"
    PREPARE_FAILED = "PREPARE_FAILED"
    PREPARE_TIMEOUT = "PREPARE_TIMEOUT"
    # A step failed in a way none of the above names (the error says which step and why).
    INTERNAL_ERROR = "INTERNAL_ERROR"


FINAL = frozenset({Status.ACTIVE, Status.FAILED, Status.DELETED, Status.SHUTDOWN, Status.UNKNOWN})
# A provisioned instance: its guest heartbeats and answers the guest API.
SERVING = frozenset({Status.ACTIVE, Status.SHUTDOWN, Status.UNKNOWN})
# A delete may start from these; the provisioning chain of a NEW or BUILD one stops at its next step.
DELETABLE = frozenset({Status.NEW, Status.BUILD, Status.ACTIVE, Status.FAILED, Status.SHUTDOWN, Status.UNKNOWN})
# Instances whose guest holds a broker user: minted by create_queue, revoked by delete.
HOLDS_BROKER_USER = frozenset({"BUILD", "ACTIVE", "FAILED", "SHUTDOWN", "UNKNOWN"})
JSON_FIELDS = frozenset({"users", "databases", "config", "connection"})
FLOAT_FIELDS = frozenset({"boot_delay_s", "ping_deadline_s", "prepare_deadline_s"})
INT_FIELDS = frozenset({"ping_attempts", "boots", "prepare_sent", "prepare_deliveries", "prepare_applied",
                        "prepare_rolled_back", "dead_letters", "keys_removed", "guest_user_revoked", "heartbeat_seq",
                        "heartbeats", "guest_consumers"})

# KEYS[1] record, KEYS[2] the transition counts (berth.metrics). ARGV: new status, now, number of
# allowed old statuses, those statuses, then field/value pairs. Returns {1, old, since} when
# applied (since: the previous status_changed_at, or created_at), {0, old or false} when refused.
# The count is best effort (pcall): a metrics key in a bad state never fails a transition.
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, false} end
local n = tonumber(ARGV[3])
local ok = false
for i = 4, 3 + n do if ARGV[i] == cur then ok = true end end
if not ok then return {0, cur} end
local since = redis.call('HGET', KEYS[1], 'status_changed_at') or redis.call('HGET', KEYS[1], 'created_at') or ''
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'status_changed_at', ARGV[2])
for i = 4 + n, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.pcall('HINCRBY', KEYS[2], cur .. '|' .. ARGV[1], 1)
return {1, cur, since}
"""


# A new record, in one round trip and all or nothing: the record, its place in the index, the
# request's secrets (sealed at rest, expiring) and its mark as in flight. KEYS[1] record, KEYS[2]
# the finished-request marker, KEYS[3] the record index, KEYS[4] the in-flight index, KEYS[5] the
# secrets. ARGV: request id, now, instance id, secrets' TTL (s), number of fields, field/value
# pairs, then secret name/value pairs. Returns {'created'}, {'mine'} (this request made it
# already), {'exists', status} or {'finished'} (a stale redelivery of a deleted instance's request).
_CREATE = """
if redis.call('EXISTS', KEYS[2]) == 1 then return {'finished'} end
local cur = redis.call('HMGET', KEYS[1], 'status', 'request_id')
if cur[1] and cur[1] ~= 'DELETED' then
  if cur[2] == ARGV[1] then return {'mine'} end
  return {'exists', cur[1]}
end
local n = tonumber(ARGV[5])
redis.call('DEL', KEYS[1], KEYS[5])
redis.call('HSET', KEYS[1], unpack(ARGV, 6, 5 + 2 * n))
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
if #ARGV > 5 + 2 * n then
  redis.call('HSET', KEYS[5], unpack(ARGV, 6 + 2 * n, #ARGV))
  redis.call('EXPIRE', KEYS[5], ARGV[4])
end
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[3])
return {'created'}
"""


# Whether a task is a step of the instance's own chains: its id is ``<id>.<step>.<tag>``, the tag
# being the first 12 hex digits of the SHA-1 of the provisioning or delete request id
# (`berth.ids.step_task_id`). A stray call of a step from a shell records nothing.
_OWN = """
local function own(record, instance_id, step, task_id)
  for _, field in ipairs({'request_id', 'delete_request_id'}) do
    local rid = redis.call('HGET', record, field)
    if rid and instance_id .. '.' .. step .. '.' .. string.sub(redis.sha1hex(rid), 1, 12) == task_id then
      return true
    end
  end
  return false
end
"""
# KEYS[1] the record, KEYS[2] the in-flight index. ARGV: instance id, step, task id, now, '1' to
# note in the index that the instance's chain ran a step now (for the reconciler). Keeps the
# time of the step's first run in ``<step>_started_at``; for an own step returns the record as
# it is then (HGETALL: the step reads it without a round trip of its own), else 0.
_START = _OWN + """
if ARGV[5] == '1' then redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1]) end
if not own(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
redis.call('HSETNX', KEYS[1], ARGV[2] .. '_started_at', ARGV[4])
return redis.call('HGETALL', KEYS[1])
"""
# KEYS[1] the record, KEYS[2] the histogram. ARGV: instance id, step, task id, now, the field to
# fall back on when the start was not recorded ('' for none), the number of buckets N, their N
# upper bounds, their N labels. The first success of an own step marks ``<step>_finished_at``,
# adds its duration to the histogram (buckets, sum and count at once) and returns it as a
# string; any later one, a stray call or a record that is gone returns false.
_FINISH = _OWN + """
if redis.call('EXISTS', KEYS[1]) == 0 or not own(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return false end
if redis.call('HSETNX', KEYS[1], ARGV[2] .. '_finished_at', ARGV[4]) == 0 then return false end
local started = redis.call('HGET', KEYS[1], ARGV[2] .. '_started_at')
if not started and ARGV[5] ~= '' then started = redis.call('HGET', KEYS[1], ARGV[5]) end
if not started then return false end
local duration = math.max(0, tonumber(ARGV[4]) - tonumber(started))
local n = tonumber(ARGV[6])
for i = 1, n do
  local label = ARGV[6 + n + i]
  if label == '+Inf' or duration <= tonumber(ARGV[6 + i]) then
    redis.call('HINCRBY', KEYS[2], ARGV[2] .. '|' .. label, 1)
  end
end
local text = string.format('%.6f', duration)
redis.call('HINCRBYFLOAT', KEYS[2], ARGV[2] .. '|sum', text)
redis.call('HINCRBY', KEYS[2], ARGV[2] .. '|count', 1)
return text
"""


# KEYS: record, index. ARGV: instance id, seq, datastore status. Times are the broker's (TIME), so
# taskmanagers whose clocks differ agree on every heartbeat's age.
# Returns {outcome, old status, previous status_changed_at, now}.
_APPLY = """
local t = redis.call('TIME')
local now = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1000000)
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'ACTIVE' and st ~= 'SHUTDOWN' and st ~= 'UNKNOWN' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {'not_serving', st or '', '', now}
end
local last = tonumber(redis.call('HGET', KEYS[1], 'heartbeat_seq') or '-1')
if tonumber(ARGV[2]) <= last then return {'out_of_order', st, '', now} end
redis.call('HSET', KEYS[1], 'heartbeat_seq', ARGV[2], 'last_heartbeat_at', now, 'heartbeat_datastore', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'heartbeats', 1)
redis.call('ZADD', KEYS[2], now, ARGV[1])
local new = 'SHUTDOWN'
if ARGV[3] == 'running' then new = 'ACTIVE' end
if new == st then return {'applied', st, '', now} end
local since = redis.call('HGET', KEYS[1], 'status_changed_at') or redis.call('HGET', KEYS[1], 'active_at') or ''
redis.call('HSET', KEYS[1], 'status', new, 'status_changed_at', now, 'updated_at', now)
return {'changed', st, since, now}
"""

# KEYS: record, index. ARGV: instance id, expiry. Returns {outcome, old status, since, last heard, now}.
_EXPIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'ACTIVE' and st ~= 'SHUTDOWN' and st ~= 'UNKNOWN' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {'not_serving', st or '', '', '', ''}
end
local heard = redis.call('HGET', KEYS[1], 'last_heartbeat_at') or redis.call('HGET', KEYS[1], 'active_at') or '0'
local stamp = string.format('%.6f', now)
if st == 'UNKNOWN' or now - tonumber(heard) < tonumber(ARGV[2]) then
  return {'unchanged', st, '', heard, stamp}
end
local since = redis.call('HGET', KEYS[1], 'status_changed_at') or redis.call('HGET', KEYS[1], 'active_at') or ''
redis.call('HSET', KEYS[1], 'status', 'UNKNOWN', 'status_changed_at', stamp, 'updated_at', stamp)
return {'changed', st, since, heard, stamp}
"""


def _encode(name: str, value: Any) -> str:
    if name in JSON_FIELDS:
        return json.dumps(value, sort_keys=True)
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


def text(value: Any) -> str:
    """A Redis reply as str (clients here decode responses; this also satisfies the type checker)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode(name: str, raw: Any) -> Any:
    raw = text(raw)
    if name in JSON_FIELDS:
        return json.loads(raw)
    if name.endswith("_at") or name in FLOAT_FIELDS:
        return float(raw)
    if name in INT_FIELDS:
        return int(raw)
    return raw


@dataclass(frozen=True)
class InstanceRecord:
    fields: dict[str, Any]

    @property
    def instance_id(self) -> str:
        return str(self.fields["instance_id"])

    @property
    def status(self) -> Status:
        return Status(self.fields["status"])

    @property
    def reason(self) -> str | None:
        return self.fields.get("reason")

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]


class Records:
    """Read and write instance records in the broker's Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._transition = client.register_script(_TRANSITION)
        self._create = client.register_script(_CREATE)

    def create(self, request: ProvisionRequest, request_id: str, now: float | None = None, *,
               sealed: dict[str, str] | None = None, secrets_ttl_s: float = 0.0) -> bool:
        """Create the NEW record, in flight, with the request's ``sealed`` passwords kept aside for
        ``secrets_ttl_s``: all in one round trip, or nothing. True if created, False if this same
        request made it already.

        Raises InstanceExists when another request owns the id (unless that one was DELETED).
        """
        instance_id = request.instance_id
        now = time.time() if now is None else now
        fields = {**request.public(), "status": Status.NEW, "request_id": request_id,
                  "created_at": now, "updated_at": now, "ping_attempts": 0}
        pairs = [item for name, value in fields.items() for item in (name, _encode(name, value))]
        secret_pairs = [item for name, value in (sealed or {}).items() for item in (name, value)]
        outcome = self._create(
            keys=[record_key(instance_id), finished_request_key(request_id), RECORD_INDEX_KEY, INFLIGHT_KEY,
                  secrets_key(instance_id)],
            args=[request_id, str(now), instance_id, max(1, int(secrets_ttl_s)), len(fields), *pairs,
                  *secret_pairs])
        verdict = [text(part) for part in outcome]
        if verdict[0] == "finished":
            raise RequestFinished(f"request {request_id} for {instance_id} finished "
                                  "long ago (its instance was deleted): a stale redelivery")
        if verdict[0] == "exists":
            raise InstanceExists(f"instance {instance_id} already exists (status {verdict[1]})")
        if verdict[0] == "mine":
            return False
        log.info("instance %s: created NEW (datastore=%s boot=%s)", request.instance_id,
                 request.datastore, request.boot)
        return True

    def forget(self, instance_id: str, request_id: str) -> None:
        """Take back a NEW record of this request (its message could not be sent)."""
        key = record_key(instance_id)
        if self.client.hmget(key, "status", "request_id") == [Status.NEW.value, request_id]:
            with self.client.pipeline() as pipe:
                pipe.delete(key)
                pipe.zrem(RECORD_INDEX_KEY, instance_id)
                pipe.zrem(INFLIGHT_KEY, instance_id)
                pipe.execute()

    def get(self, instance_id: str) -> InstanceRecord | None:
        raw = self.client.hgetall(record_key(instance_id))
        if not raw:
            return None
        return InstanceRecord({text(k): _decode(text(k), v) for k, v in raw.items()})

    def all(self) -> list[InstanceRecord]:
        found = []
        for raw in self.client.zrange(RECORD_INDEX_KEY, 0, -1):
            record = self.get(text(raw))
            if record is None:
                # A deleted instance's audit record expired: forget it in the index too.
                self.client.zrem(RECORD_INDEX_KEY, text(raw))
            else:
                found.append(record)
        return found

    def finish_requests(self, ttl_s: float, *request_ids: str) -> None:
        """Mark requests finished for ttl_s: their messages, redelivered late, change nothing."""
        with self.client.pipeline() as pipe:
            for request_id in request_ids:
                pipe.set(finished_request_key(request_id), "1", ex=max(1, int(ttl_s)))
            pipe.execute()

    def is_finished(self, request_id: str) -> bool:
        return bool(self.client.exists(finished_request_key(request_id)))

    def expire(self, instance_id: str, ttl_s: float) -> None:
        """Keep the record (an audit trail) for ttl_s more seconds."""
        self.client.expire(record_key(instance_id), max(1, int(ttl_s)))

    def update(self, instance_id: str, **fields: Any) -> None:
        self.update_counting(instance_id, None, **fields)

    def update_counting(self, instance_id: str, counter: str | None, **fields: Any) -> None:
        """`update`, and one more in the field ``counter`` (if named), in one round trip."""
        key = record_key(instance_id)
        encoded: dict[Any, Any] = {k: _encode(k, v) for k, v in fields.items()}
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={**encoded, "updated_at": str(time.time())})
            if counter:
                pipe.hincrby(key, counter, 1)
            pipe.execute()

    def count_and_set_once(self, instance_id: str, counter: str, name: str, value: Any) -> None:
        """One more in ``counter`` and `set_once` of ``name``, in one round trip."""
        key = record_key(instance_id)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hincrby(key, counter, 1)
            pipe.hsetnx(key, name, _encode(name, value))
            pipe.execute()

    def set_once(self, instance_id: str, name: str, value: Any) -> Any:
        """Set a field unless already set, return the stored value (redelivery keeps the first)."""
        return self.set_each_once(instance_id, **{name: value})[name]

    def set_each_once(self, instance_id: str, **fields: Any) -> dict[str, Any]:
        """`set_once` for several fields, in one round trip; the stored values."""
        key = record_key(instance_id)
        with self.client.pipeline(transaction=True) as pipe:
            for name, value in fields.items():
                pipe.hsetnx(key, name, _encode(name, value))
            pipe.hmget(key, list(fields))
            stored = pipe.execute()[-1]
        return {name: _decode(name, raw) for name, raw in zip(fields, stored, strict=True)}

    def mark_step_started(self, instance_id: str, step: str, task_id: str, now: float, *,
                          ran: bool) -> InstanceRecord | None:
        """Keep ``<step>_started_at`` (the first run's time) for a step of the instance's own chain
        and return its record as it is now; with ``ran``, note in the in-flight index that its chain
        ran a step now. None for a stray call or a record not made yet (metrics.step_started says more)."""
        start = self.client.register_script(_START)
        found = start(keys=[record_key(instance_id), INFLIGHT_KEY],
                      args=[instance_id, step, task_id, repr(now), "1" if ran else ""])
        if not isinstance(found, list) or not found:
            return None
        pairs = iter(found)
        return InstanceRecord({text(k): _decode(text(k), v) for k, v in zip(pairs, pairs, strict=True)})

    def mark_step_succeeded(self, instance_id: str, step: str, task_id: str, now: float, bounds: list[str],
                            labels: tuple[str, ...]) -> float | None:
        """Mark ``<step>_finished_at`` at the first success of an own step and add its duration to the
        histogram (buckets ``bounds``/``labels``), in one call; the duration, or None (metrics.step_succeeded)."""
        fallback = "created_at" if step == "create_queue" else ""
        finish = self.client.register_script(_FINISH)
        found = finish(keys=[record_key(instance_id), STEP_HISTOGRAM_KEY],
                       args=[instance_id, step, task_id, repr(now), fallback, len(labels), *bounds, *labels])
        return None if found is None or found in ("", b"") else float(found)

    def apply_heartbeat(self, instance_id: str, seq: int, datastore_status: str) -> tuple[str, ...]:
        """Apply one checked heartbeat (tasks/heartbeats.py): (outcome, old status, since, now)."""
        apply = self.client.register_script(_APPLY)
        return tuple(text(v) for v in apply(keys=[record_key(instance_id), HEARTBEAT_INDEX_KEY],
                                            args=[instance_id, seq, datastore_status]))

    def expire_silent(self, instance_id: str, expiry_s: float) -> tuple[str, ...]:
        """UNKNOWN if not heard from for ``expiry_s``: (outcome, old status, since, last heard, now)."""
        expire = self.client.register_script(_EXPIRE)
        return tuple(text(v) for v in expire(keys=[record_key(instance_id), HEARTBEAT_INDEX_KEY],
                                             args=[instance_id, expiry_s]))

    def live_guests(self) -> list[tuple[str, str]]:
        """(instance id, request id) of every instance whose guest holds broker credentials:
        minted by create_queue, revoked by delete (while DELETING)."""
        ids = [text(raw) for raw in self.client.zrange(RECORD_INDEX_KEY, 0, -1)]
        with self.client.pipeline(transaction=False) as pipe:
            for instance_id in ids:
                pipe.hmget(record_key(instance_id), ["status", "request_id"])
            found = pipe.execute()
        return [(iid, text(rid)) for iid, (status, rid) in zip(ids, found, strict=True)
                if status is not None and rid and text(status) in HOLDS_BROKER_USER]

    def step_ran(self, instance_id: str, now: float | None = None) -> None:
        """A step of the instance's chain (provisioning or delete) ran just now."""
        self.client.zadd(INFLIGHT_KEY, {instance_id: time.time() if now is None else now})

    def transition(self, instance_id: str, to: Status, allowed_from: Iterable[Status],
                   step: str, **fields: Any) -> bool:
        """Move to ``to`` only from one of ``allowed_from``; log and count it. False if refused.

        Records ``status_changed_at``; the log line says how long the instance was in its old status.
        """
        allowed = [s.value for s in allowed_from]
        now = time.time()
        fields["updated_at"] = now
        pairs: list[str] = []
        for name, value in fields.items():
            pairs += [name, _encode(name, value)]
        applied, old, *rest = self._transition(keys=[record_key(instance_id), TRANSITIONS_KEY],
                                               args=[to.value, str(now), len(allowed), *allowed, *pairs])
        if applied and to in FINAL:
            self.client.zrem(INFLIGHT_KEY, instance_id)
        if applied:
            try:
                since: float | None = max(0.0, now - float(text(rest[0])))
            except (IndexError, ValueError):
                since = None
            log.info("%s", transition_line(instance_id, text(old), to.value, step, fields, since))
        return bool(applied)


def count_transition(client: redis.Redis, old: str, new: str) -> None:
    """Count one status change ``old -> new`` (``berth_transitions_total``)."""
    client.hincrby(TRANSITIONS_KEY, f"{old}|{new}", 1)


def log_transition(instance_id: str, old: str, new: str, step: str, fields: dict[str, Any],
                   duration_s: float | None = None, *, client: redis.Redis) -> None:
    """Log and count one status change: for writers that change a status themselves, once applied.

    One line, human text then a JSON object (`berth.logs.transition_line`), e.g.
    ``instance db-1: ACTIVE -> UNKNOWN (step=heartbeat) {"event": "transition", "instance_id": "db-1",
    "from": "ACTIVE", "to": "UNKNOWN", "step": "heartbeat", "duration_s": 31.2, "error": "..."}``.
    ``duration_s``: seconds the instance spent in ``old``. `Records.transition` logs the same line
    and counts in its Lua call. The count goes to ``client`` (the broker's Redis); best effort: a
    failure is logged, never raised.
    """
    log.info("%s", transition_line(instance_id, old, new, step, fields, duration_s))
    try:
        count_transition(client, old, new)
    except Exception as exc:  # noqa: BLE001 - a metric never fails a transition that happened
        log.warning("instance %s: transition %s -> %s not counted: %s", instance_id, old, new, exc)
