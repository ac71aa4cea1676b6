"""What this guest has prepared, read from its prepare journal, and how that datastore is."""

from __future__ import annotations

from typing import Any

from berth.paths import guest_dir
from guest.datastores import get_manager
from guest.journal import Journal


def prepared_datastore(instance_id: str) -> str | None:
    """The datastore prepare set up on this guest, or None before any prepare was applied."""
    for result in Journal(guest_dir(instance_id)).read()["results"].values():
        return str(result["connection"]["datastore"])
    return None


def datastore_status(instance_id: str) -> dict[str, Any] | None:
    """The prepared datastore's status ({'datastore', 'status': 'running' | 'down' | ...}), or None."""
    datastore = prepared_datastore(instance_id)
    return None if datastore is None else get_manager(datastore, guest_dir(instance_id)).status()
