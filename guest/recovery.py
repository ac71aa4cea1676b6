"""A restarted guest takes back what its previous run was given and never acknowledged.

Each guest has its own ack-emulation keys (``unacked.<id>``...), and exactly one agent serves
an instance, so everything in them at start-up was in flight in a run that died (SIGKILL,
power loss). Putting it back at once means a prepare interrupted mid-way is redelivered
when the guest comes back, not an hour later when the visibility timeout would expire.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import IO

from celery import Celery

from berth.paths import AGENT_LOCK

log = logging.getLogger("berth.guest")
# The open lock file; the kernel releases the lock when this process ends, however it ends.
_lock: IO[str] | None = None


class AgentRunning(RuntimeError):
    """Another agent for the same instance already runs on this host."""


def hold_agent_lock(home: Path) -> None:
    """Take this instance's agent lock for the life of the process, or raise AgentRunning."""
    global _lock
    home.mkdir(parents=True, exist_ok=True)
    handle = open(home / AGENT_LOCK, "a+")  # noqa: SIM115 - held open on purpose
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise AgentRunning(f"another agent (pid {holder}) already serves it on this host") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    _lock = handle


def restore_unacked(app: Celery) -> int:
    """Move this guest's unacknowledged messages back to its queue; return how many."""
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=None, interval_start=0.5, interval_step=0.5, interval_max=2.0)
        channel = conn.default_channel
        client = channel.client
        tags = client.hkeys(channel.unacked_key)
        for tag in tags:
            channel.qos.restore_by_tag(tag, client=client)
    if tags:
        log.warning("restored %d message(s) a previous run of this guest took and never acknowledged", len(tags))
    return len(tags)
