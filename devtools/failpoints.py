"""Named crash points for the drills: a process stops at an exact step, then is killed from outside.

The taskmanager's steps name their points (`berth.checkpoints.reached`); this module watches
them, and is loaded into a taskmanager only when ``BERTH_FAILPOINTS`` is set (a comma-separated
list of point names; celeryconfig imports it then). At an enabled point the process writes a
marker file named after the point into ``BERTH_FAILPOINT_DIR`` and then hangs, holding whatever it holds (an
unacknowledged message, a half-done step), until the drill SIGKILLs it. A drill therefore
kills a taskmanager *after* create_queue declared the queue but *before* the chain went on,
which no outside timing can hit reliably.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from berth import checkpoints


def _enabled() -> frozenset[str]:
    return frozenset(p.strip() for p in os.environ.get("BERTH_FAILPOINTS", "").split(",") if p.strip())


def failpoint(name: str) -> None:
    """Hang here if the drill asked for it (see the module docstring)."""
    if name not in _enabled():
        return
    folder = Path(os.environ.get("BERTH_FAILPOINT_DIR") or ".")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(str(os.getpid()))
    while True:
        time.sleep(60)


checkpoints.watch(failpoint)
