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


def guest_dir(instance_id: str) -> Path:
    """A guest's own disk: on a real cloud this is inside the VM."""
    return berth_home() / "guests" / instance_id


def guests_root() -> Path:
    return berth_home() / "guests"
