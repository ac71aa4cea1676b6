"""Where a task's time goes: broker round trips and slot time per task name, for `make bench`.

Off unless ``BERTH_COUNT_ROUND_TRIPS`` is set in a worker's environment (bench.latency sets it
for its taskmanager). Then each worker process counts, for the task it runs:

- ``redis``: packed sends to Redis (a command, or a whole pipeline or script: one round trip each);
- ``amqp``: AMQP waits (a synchronous method or a publisher confirm: one round trip each);
- ``http``: answers read from RabbitMQ's management API;
- ``slot_us``: the time from ``task_prerun`` to ``task_postrun``, which covers the task's body, its
  result and the publish of the chain's next step (Celery does those inside the traced call);

and adds them, once per run, to the hash ``COUNTS_KEY`` on the store (that write is not counted).
What the worker's main process does for a task (its events, the ack of a prefork child's task) is
not in the figures. The patch is process-wide and never undone: it belongs in a benchmark's worker.
``BERTH_ROUND_TRIP_TRACE=FILE`` (with counting on) writes each round trip and its caller to FILE.
"""

from __future__ import annotations

import os
import re
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

ENV = "BERTH_COUNT_ROUND_TRIPS"
# With counting on: append each counted round trip, with its caller, to this file (a profile).
TRACE_ENV = "BERTH_ROUND_TRIP_TRACE"
COUNTS_KEY = "berth:bench:round-trips"
KINDS = ("redis", "amqp", "http")

_state = threading.local()
_installed = False


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def _count(kind: str) -> None:
    counts = getattr(_state, "counts", None)
    if counts is not None:
        counts[kind] += 1


def _counting(kind: str, method: Callable[..., Any]) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        _count(kind)
        trace = os.environ.get(TRACE_ENV)
        if trace and getattr(_state, "counts", None) is not None:
            _trace(trace, kind, args[1] if len(args) > 1 else None)
        return method(*args, **kwargs)

    counted.__wrapped__ = method  # type: ignore[attr-defined]
    return counted


def _trace(path: str, kind: str, sent: Any) -> None:
    """One line per round trip: the task, ms since its start, the kind, Redis's command names, the caller's frames."""
    what = ""
    if kind == "redis":
        chunks = sent if isinstance(sent, (list, tuple)) else [sent]
        packed = b"".join(bytes(chunk) for chunk in chunks if isinstance(chunk, (bytes, bytearray, memoryview)))
        what = " ".join(name.decode() for name in re.findall(rb"\*\d+\r\n\$\d+\r\n([A-Za-z]+)", packed))
    where = " < ".join(f"{frame.name}:{frame.lineno}" for frame in traceback.extract_stack()[-14:-3])
    with open(path, "a", encoding="utf-8") as out:
        out.write(f"{_state.task} {1000 * (time.perf_counter() - _state.started):.2f} {kind} {what} @ {where}\n")


def install() -> None:
    """Count round trips from now on in this process (idempotent)."""
    global _installed
    if _installed:
        return
    import http.client

    import redis.connection
    from amqp.abstract_channel import AbstractChannel

    patches = [(redis.connection.AbstractConnection, "send_packed_command", "redis"),
               (AbstractChannel, "wait", "amqp"),
               (http.client.HTTPConnection, "getresponse", "http")]
    for owner, name, kind in patches:
        setattr(owner, name, _counting(kind, getattr(owner, name)))
    _installed = True


def begin(task_name: str) -> None:
    """A task starts in this thread: count for it."""
    _state.counts = dict.fromkeys(KINDS, 0)
    _state.task = task_name
    _state.started = time.perf_counter()


def end(write: Callable[[str, dict[str, int]], None]) -> None:
    """The task of `begin` ended: hand its figures to ``write(task_name, figures)``, uncounted."""
    counts = getattr(_state, "counts", None)
    if counts is None:
        return
    _state.counts = None
    figures = {**counts, "runs": 1, "slot_us": int((time.perf_counter() - _state.started) * 1e6)}
    write(_state.task, figures)


def add_to(client: Any) -> Callable[[str, dict[str, int]], None]:
    """A `write` for `end` that adds the figures to COUNTS_KEY on ``client`` in one round trip."""
    def write(task_name: str, figures: dict[str, int]) -> None:
        pipe = client.pipeline(transaction=False)
        for kind, value in figures.items():
            pipe.hincrby(COUNTS_KEY, f"{task_name}|{kind}", value)
        pipe.execute()
    return write


def read(client: Any) -> dict[str, dict[str, int]]:
    """Per task name: the summed figures of every run so far (`runs`, each kind, `slot_us`)."""
    per_task: dict[str, dict[str, int]] = {}
    for field, value in client.hgetall(COUNTS_KEY).items():
        field = field.decode() if isinstance(field, bytes) else field
        task_name, kind = field.rsplit("|", 1)
        per_task.setdefault(task_name, {})[kind] = int(value)
    return per_task


def per_run(totals: dict[str, int]) -> dict[str, float]:
    """Each figure of a task averaged over its runs (slot time in ms)."""
    runs = max(1, totals.get("runs", 0))
    figures = {kind: totals.get(kind, 0) / runs for kind in KINDS}
    figures["slot_ms"] = totals.get("slot_us", 0) / runs / 1000
    figures["runs"] = totals.get("runs", 0)
    return figures
