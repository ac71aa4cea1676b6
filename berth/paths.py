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


def result_url_file() -> Path:
    """Where `make run` with RabbitMQ writes the URL of the Redis beside it (records and answers)."""
    return berth_home() / "results.url"


def rabbitmq_api_file() -> Path:
    """Where `make run`'s private RabbitMQ node writes its management API's address."""
    return berth_home() / "rabbitmq-api.url"


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


def replace_file(path: Path, text: str, mode: int = 0o644) -> None:
    """Write text to path whole or not at all: to a temporary file, on disk, then renamed over it.

    A process killed mid-write leaves the old file, never half of a new one.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def create_once(path: Path, text: str) -> str:
    """path's content, after writing text there (mode 0600) if it did not exist yet.

    Written whole under another name, then linked into place: never half a file, and of two
    processes creating it at once, the first link wins and both read that one.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.new")
        replace_file(tmp, text, mode=0o600)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text()
