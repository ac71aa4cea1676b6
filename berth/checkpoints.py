"""Named points in the taskmanager's steps that a harness may watch: a drill stops a process there.

Nothing watches in production, so reaching a point costs one empty loop. The crash drills load
`devtools.failpoints` into the taskmanager (celeryconfig imports it when ``BERTH_FAILPOINTS`` is
set), which watches and hangs the process at the named points until the drill kills it.
"""

from __future__ import annotations

from collections.abc import Callable

POINTS = ("create_queue.done", "send_prepare.done")
_watchers: list[Callable[[str], None]] = []


def watch(callback: Callable[[str], None]) -> None:
    """Call ``callback(name)`` at every point reached in this process from now on."""
    _watchers.append(callback)


def reached(name: str) -> None:
    """The step got to point ``name`` (one of POINTS)."""
    for callback in _watchers:
        callback(name)
