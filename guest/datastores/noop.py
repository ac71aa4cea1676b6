"""A datastore that only takes time: for drills and benchmarks.

config: ``prepare_seconds`` (how long prepare takes), ``fail`` (prepare raises this message).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from berth.errors import DatastoreError, PrepareError

NO_API = "the noop datastore has no databases or users (provision with datastore redis)"


class NoopManager:
    name = "noop"

    def __init__(self, home: Path) -> None:
        self.marker = home / "noop.json"

    def prepare(self, users: list[dict[str, str]], databases: list[str], config: dict[str, Any]) -> dict[str, Any]:
        time.sleep(float(config.get("prepare_seconds", 0)))
        if config.get("fail"):
            raise PrepareError(str(config["fail"]))
        self.marker.write_text(json.dumps({"users": [u["name"] for u in users], "databases": databases}))
        return {"datastore": self.name, "users": [u["name"] for u in users], "databases": databases}

    def shutdown(self) -> dict[str, Any]:
        if self.marker.exists():
            self.marker.replace(self.marker.with_suffix(".stopped"))
        return self.status()

    def restart(self) -> dict[str, Any]:
        stopped = self.marker.with_suffix(".stopped")
        if stopped.exists():
            stopped.replace(self.marker)
        if not self.marker.exists():
            raise DatastoreError("the noop datastore is not prepared")
        return self.status()

    def list_databases(self) -> list[str]:
        raise DatastoreError(NO_API)

    def create_database(self, name: str, *, again: bool = False) -> dict[str, Any]:
        raise DatastoreError(NO_API)

    def delete_database(self, name: str, *, again: bool = False) -> dict[str, Any]:
        raise DatastoreError(NO_API)

    def list_users(self) -> list[dict[str, Any]]:
        raise DatastoreError(NO_API)

    def create_user(self, name: str, password: str, databases: list[str] | None, *,
                    again: bool = False) -> dict[str, Any]:
        raise DatastoreError(NO_API)

    def delete_user(self, name: str, *, again: bool = False) -> dict[str, Any]:
        raise DatastoreError(NO_API)

    def discard(self) -> None:
        self.marker.unlink(missing_ok=True)

    def status(self) -> dict[str, Any]:
        if self.marker.exists():
            return {"datastore": self.name, "status": "running"}
        stopped = self.marker.with_suffix(".stopped").exists()
        return {"datastore": self.name, "status": "stopped" if stopped else "not prepared"}
