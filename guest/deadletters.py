"""A guest's dead-letter list: what it received and could not accept, kept for the operator.

Each entry is one JSON object on the Redis list ``berth:deadletter:<id>`` (newest first)::

    {"reason": "undecodable" | "no_task_header" | "unknown_task" | "invalid" | "poison" | ...,
     "error": "short description", "task": name or null, "id": task id or null,
     "content_type": ..., "size": body bytes or null, "received_at": epoch seconds}

An entry never holds the message body, its arguments or their repr: a prepare carries
passwords. `push` keeps only the fields above, so a caller cannot store more by mistake.
The list holds the newest `MAX_ENTRIES`; older entries are dropped.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import redis

from berth.errors import Malformed
from berth.ids import deadletter_key
from berth.untrusted import MAX_DEADLETTER_BYTES, clean, decode_json, describe_oversized, take_lists

MAX_ENTRIES = 1000
# Longest text kept per field: an entry describes a message, it never carries one.
FIELD_LIMITS = {"reason": 40, "error": 300, "task": 200, "id": 200, "content_type": 100}


def _text(value: object, limit: int) -> str | None:
    if not isinstance(value, str):
        return None
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def normalise(entry: dict[str, Any]) -> dict[str, Any]:
    """The entry as it is stored: the documented fields only, texts cut short, types fixed."""
    clean: dict[str, Any] = {name: _text(entry.get(name), limit) for name, limit in FIELD_LIMITS.items()}
    clean["reason"] = clean["reason"] or "invalid"
    clean["error"] = clean["error"] or ""
    size = entry.get("size")
    clean["size"] = size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None
    clean["received_at"] = _number(entry.get("received_at")) or time.time()
    return clean


def push(client: redis.Redis, instance_id: str, entry: dict[str, Any]) -> None:
    """Add one entry at the head of the instance's list and drop all but the newest MAX_ENTRIES.

    Raises what the Redis client raises: callers log it and go on dropping the message.
    """
    key = deadletter_key(instance_id)
    with client.pipeline(transaction=True) as pipe:
        pipe.lpush(key, json.dumps(normalise(entry), sort_keys=True))
        pipe.ltrim(key, 0, MAX_ENTRIES - 1)
        pipe.execute()


def read(client: redis.Redis, instance_id: str, limit: int = 100) -> list[dict[str, Any]]:
    """The newest ``limit`` entries, newest first, read as a guest's hostile bytes (`berth.untrusted`).

    Each entry is bounded on the broker, parsed with limits, cut to the documented fields and
    escaped; one that is not (too large, not UTF-8, not a JSON object) is shown as ``unreadable``
    with the reason. Give a ``client`` that returns bytes: a guest's entry need not be UTF-8.
    """
    if limit <= 0:
        return []
    [items] = take_lists(client, [deadletter_key(instance_id)], 0, limit - 1, MAX_DEADLETTER_BYTES)
    return [clean(normalise(_entry(raw))) for raw in items]


def _entry(raw: bytes | str | int) -> dict[str, Any]:
    try:
        if isinstance(raw, int):
            raise Malformed(describe_oversized(raw, "the entry", MAX_DEADLETTER_BYTES))
        entry = decode_json(raw, "the entry", MAX_DEADLETTER_BYTES, max_depth=2)
        if not isinstance(entry, dict):
            raise Malformed("the entry is not a JSON object")
    except Malformed as exc:
        return {"reason": "unreadable", "error": str(exc)}
    return entry


__all__ = ["MAX_ENTRIES", "normalise", "push", "read"]
