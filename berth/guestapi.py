"""The guest API beyond prepare: its operations and their arguments, checked on both sides.

The taskmanager checks a call's arguments before it sends anything (a clear error, nothing
sent); the guest checks them again (it trusts nothing it did not check). Each operation is
the guest task ``guest.<name>`` taking ``instance_id`` and these keyword arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from berth.spec import InvalidField, check_database_name, check_databases, check_password, check_user_name


@dataclass(frozen=True)
class Operation:
    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    # Changes the datastore: applied once per message, whatever redeliveries (guest/api.py).
    changes: bool
    summary: str


OPERATIONS = {op.name: op for op in (
    Operation("get_status", (), (), False, "the agent's version and the datastore's status"),
    Operation("restart", (), (), True, "stop the datastore if it runs, start it again"),
    Operation("list_databases", (), (), False, "the datastore's databases (redis: key namespaces DB:*)"),
    Operation("create_database", ("name",), (), True, "add a database"),
    Operation("delete_database", ("name",), (), True, "remove a database, its keys and every user's access to it"),
    Operation("list_users", (), (), False, "the datastore's users and the databases each may use"),
    Operation("create_user", ("name", "password"), ("databases",), True,
              "add a user allowed the given databases (default: all)"),
    Operation("delete_user", ("name",), (), True, "remove a user"),
)}


class UnknownOperation(ValueError):
    pass


def operation(name: object) -> Operation:
    if not isinstance(name, str) or name not in OPERATIONS:
        raise UnknownOperation(f"unknown guest operation {name!r} (known: {', '.join(OPERATIONS)})")
    return OPERATIONS[name]


def check_arguments(name: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The operation's arguments, checked; InvalidField names the first bad one."""
    op = operation(name)
    unknown = sorted(set(arguments) - set(op.required) - set(op.optional))
    if unknown:
        accepted = ", ".join(op.required + op.optional) or "none"
        raise InvalidField(unknown[0], f"not an argument of {name} (accepted: {accepted})")
    missing = [arg for arg in op.required if arg not in arguments]
    if missing:
        raise InvalidField(missing[0], f"{name} needs it")
    checked = dict(arguments)
    if "name" in checked:
        check = check_user_name if name.endswith("_user") else check_database_name
        check(checked["name"], "name")
    if "password" in checked:
        check_password(checked["password"], "password")
    if checked.get("databases") is not None:
        checked["databases"] = list(check_databases(checked["databases"]))
    return checked
