"""One agent per instance on a host: then the guest's unacked keys are its own to restore.

Each guest has its own ack-emulation keys (``unacked.<id>``...); everything in them that the
running agent is not working on was in flight in a run that died, and `berth.brokers.redis.unacked` puts it
back when the agent connects (see there).
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import IO

from berth.errors import AgentRunning
from berth.paths import AGENT_LOCK

log = logging.getLogger("berth.guest")
# The open lock file; the kernel releases the lock when this process ends, however it ends.
_lock: IO[str] | None = None


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
