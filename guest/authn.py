"""A guest believes only messages it can verify: signed for it, unaltered, unexpired, not replayed.

The taskmanager signs every message to a guest with that guest's key (`berth.keys.GuestKey.sign`:
the instance id, every Celery header (task name, id, expiry, eta, ignore_result, ...) and the
whole body: args, kwargs and Celery's embed). Celery's ``auth`` serializer would sign the body
only; the name, id and expiry live in headers. Before
Celery sees a message, the guest's consumer (guest/consumer.py) asks `check`, in this order:

1. **retargeted**: its task id or its ``instance_id`` argument names another instance;
2. **unsigned**: no signature header;
3. **tampered**: the signature does not match (altered, or signed with another guest's key);
4. **expired**: its signed expiry has passed (or it has none);
5. **replayed**: this guest has already run a message with this id (`SpentIds`).

A refused message is logged with the reason, dead-lettered and dropped; the guest goes on
serving. Two refusals are normal and only logged: an expired message (a guest that starts late
finds the pings it missed) and a message that ran here already and comes back marked redelivered
(its acknowledgement was lost, with the broker say).
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from berth.ids import guest_task_prefix, instance_of
from berth.keys import SIGNATURE_HEADER, GuestKey
from berth.paths import replace_file

RETARGETED = "retargeted"
UNSIGNED = "unsigned"
TAMPERED = "tampered"
EXPIRED = "expired"
REPLAYED = "replayed"
# Not an attack: a message that ran here and whose ack was lost (with the broker, say) comes back
# marked redelivered by kombu's restore. Dropped quietly, like an expired one.
ALREADY_RAN = "already_ran"
QUIET = frozenset({EXPIRED, ALREADY_RAN})
SPENT_FILE = "spent.json"


@dataclass(frozen=True)
class Refusal:
    reason: str
    error: str


class SpentIds:
    """Ids of the messages this guest has run, on its own disk, each kept until it expires.

    A message is spent once it ran and its result is stored (not when it arrived): one that was
    running when the guest was killed, or whose result could not be stored, comes back and runs
    again, where prepare's journal keeps it from applying twice.
    """

    def __init__(self, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.path = home / SPENT_FILE
        self._lock = threading.Lock()
        self._ids: dict[str, float] = {}
        if self.path.exists():
            try:
                self._ids = {str(k): float(v) for k, v in json.loads(self.path.read_text()).items()}
            except (ValueError, AttributeError):
                self._ids = {}

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._ids

    def spend(self, task_id: str, expires_at: float) -> None:
        now = time.time()
        with self._lock:
            self._ids = {k: v for k, v in self._ids.items() if v > now}
            self._ids[task_id] = expires_at
            replace_file(self.path, json.dumps(self._ids))


def expiry_epoch(expires: object) -> float | None:
    """The epoch seconds of a message's ``expires`` header (ISO 8601), or None."""
    if isinstance(expires, dt.datetime):
        when = expires
    elif isinstance(expires, str):
        try:
            when = dt.datetime.fromisoformat(expires)
        except ValueError:
            return None
    else:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def check(headers: Any, payload: Any, *, instance_id: str, key: GuestKey, spent: SpentIds,
          now: float | None = None) -> Refusal | None:
    """Why this guest refuses the message, or None when it is genuine and new."""
    headers = headers if isinstance(headers, dict) else {}
    task, task_id = headers.get("task"), headers.get("id")
    if not isinstance(task_id, str) or not task_id.startswith(guest_task_prefix(instance_id)):
        named = instance_of(task_id) if isinstance(task_id, str) else None
        return Refusal(RETARGETED, f"task id {task_id!r} is not one of this guest's"
                                   + (f" (it names instance {named!r})" if named and named != instance_id else ""))
    kwargs = payload[1] if isinstance(payload, (list, tuple)) and len(payload) == 3 else None
    if isinstance(kwargs, dict) and "instance_id" in kwargs and kwargs["instance_id"] != instance_id:
        return Refusal(RETARGETED, f"meant for instance {kwargs['instance_id']!r}, this guest serves {instance_id}")
    signature = headers.get(SIGNATURE_HEADER)
    if signature is None:
        return Refusal(UNSIGNED, f"no {SIGNATURE_HEADER} header: not sent by this guest's taskmanager")
    if not isinstance(task, str) or not key.verify(signature, instance_id=instance_id, headers=headers, body=payload):
        return Refusal(TAMPERED, "signature does not match: altered in transit, or signed with another key")
    expires_at = expiry_epoch(headers.get("expires"))
    if expires_at is None:
        return Refusal(EXPIRED, "no expiry: every message to a guest must have one")
    now = time.time() if now is None else now
    if now >= expires_at:
        return Refusal(EXPIRED, f"expired {now - expires_at:.1f} s ago")
    if task_id in spent:
        if headers.get("redelivered"):
            return Refusal(ALREADY_RAN, f"message {task_id} already ran here; its acknowledgement was lost")
        return Refusal(REPLAYED, f"message {task_id} already ran on this guest")
    return None
