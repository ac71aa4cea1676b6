"""Log lines both people and programs read: human text, then one JSON object."""

from __future__ import annotations

import json
from typing import Any


def structured(human: str, **fields: Any) -> str:
    """A log line both people and programs read: ``<human text> <one JSON object>``.

    The JSON object starts at the line's first ``{`` (the human part never holds one) and ends
    with the line; values are JSON (strings, numbers, null).
    """
    return f"{human} {json.dumps(fields, default=str)}"


def parse_structured(line: str) -> dict[str, Any] | None:
    """The JSON object of a `structured` line (a log line of any format around it), or None."""
    start = line.find("{")
    if start < 0:
        return None
    try:
        value = json.loads(line[start:].strip())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def transition_line(instance_id: str, old: str, new: str, step: str, fields: dict[str, Any],
                    duration_s: float | None) -> str:
    """The log line of one status change: ``instance db-1: BUILD -> ACTIVE (step=verify) {json}``.

    The JSON object has ``event`` ("transition"), ``instance_id``, ``from``, ``to``, ``step``,
    ``duration_s`` (seconds in ``from``, null when unknown), and ``reason`` and ``error`` when the
    change has them (errors hold no passwords; nothing else of ``fields`` is written).
    """
    detail = {k: str(fields[k]) for k in ("reason", "error") if fields.get(k) is not None}
    return structured(f"instance {instance_id}: {old} -> {new} (step={step})", event="transition",
                      instance_id=instance_id, **{"from": old, "to": new}, step=step,
                      duration_s=None if duration_s is None else round(duration_s, 4), **detail)
