"""The guest's record of prepares, on its own disk: what makes prepare idempotent.

A prepare id is recorded as done only after the datastore step finished; a redelivered
prepare with a recorded id returns the recorded result and applies nothing. Deliveries and
applications are counted so that an operator can audit "delivered N, applied once".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from berth.paths import replace_file


class Journal:
    def __init__(self, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.path = home / "prepare.json"

    def read(self) -> dict[str, Any]:
        data: dict[str, Any] = {"deliveries": {}, "applied": {}, "results": {}, "rolled_back": {}}
        if self.path.exists():
            data.update(json.loads(self.path.read_text()))
        return data

    def _write(self, data: dict[str, Any]) -> None:
        # A guest killed mid-write leaves the old journal, never half of one.
        replace_file(self.path, json.dumps(data))

    def delivered(self, prepare_id: str) -> int:
        data = self.read()
        data["deliveries"][prepare_id] = data["deliveries"].get(prepare_id, 0) + 1
        self._write(data)
        return int(data["deliveries"][prepare_id])

    def result(self, prepare_id: str) -> dict[str, Any] | None:
        result = self.read()["results"].get(prepare_id)
        return None if result is None else dict(result)

    def applied(self, prepare_id: str, result: dict[str, Any]) -> None:
        data = self.read()
        data["applied"][prepare_id] = data["applied"].get(prepare_id, 0) + 1
        data["results"][prepare_id] = result
        self._write(data)

    def rolled_back(self, prepare_id: str) -> None:
        """A prepare that finished after its deadline was undone: counted, never applied."""
        data = self.read()
        data["rolled_back"][prepare_id] = data["rolled_back"].get(prepare_id, 0) + 1
        self._write(data)

    def counts(self, prepare_id: str) -> dict[str, int]:
        """How often this prepare was delivered, applied, and rolled back (for the audit)."""
        data = self.read()
        return {name: int(data[name].get(prepare_id, 0)) for name in ("deliveries", "applied", "rolled_back")}
