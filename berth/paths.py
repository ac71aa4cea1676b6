"""Where Berth keeps its state on this host: the embedded broker's data, guest disks, logs."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent


def berth_home() -> Path:
    """The state folder: ``BERTH_HOME`` or ``var/`` in the project (git-ignored)."""
    return Path(os.environ.get("BERTH_HOME") or PROJECT_DIR / "var")


def broker_dir() -> Path:
    return berth_home() / "redis"


def broker_url_file() -> Path:
    """Written by the embedded broker so that a second shell finds it without any setting."""
    return berth_home() / "broker.url"


# Files on a guest's disk that both the boot driver and the agent know.
AGENT_PIDFILE = "agent.pid"
AGENT_LOCK = "agent.lock"


def guests_root(home: Path | None = None) -> Path:
    return (home or berth_home()) / "guests"


def guest_dir(instance_id: str, home: Path | None = None) -> Path:
    """A guest's own disk: on a real cloud this is inside the VM."""
    return guests_root(home) / instance_id
