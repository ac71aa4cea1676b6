"""The guest API beyond prepare: its operations and their arguments, checked on both sides.

The taskmanager checks a call's arguments before it sends anything (a clear error, nothing
sent); the guest checks them again (it trusts nothing it did not check). Each operation is
the guest task ``guest.<name>`` taking ``instance_id`` and these keyword arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from berth.errors import InvalidField, Malformed, UnknownOperation
from berth.spec import check_database_name, check_databases, check_password, check_user_name
from berth.untrusted import one_line


@dataclass(frozen=True)
class Operation:
    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    # Changes the datastore: applied once per message, whatever redeliveries (guest/api.py).
    changes: bool
    summary: str
    # Its command in `python -m workflows` (its required arguments but the password are positional).
    command: str
    # The shape of the guest's answer: a JSON object, or a list of strings or of objects.
    answer: type = dict
    items: type | None = None


OPERATIONS = {op.name: op for op in (
    Operation("get_status", (), (), False, "the agent's version and the datastore's status", "status"),
    Operation("restart", (), (), True, "stop the datastore if it runs, start it again", "restart"),
    Operation("list_databases", (), (), False, "the datastore's databases (redis: key namespaces DB:*)",
              "databases", list, str),
    Operation("create_database", ("name",), (), True, "add a database", "create-database"),
    Operation("delete_database", ("name",), (), True, "remove a database, its keys and every user's access to it",
              "delete-database"),
    Operation("list_users", (), (), False, "the datastore's users and the databases each may use", "users",
              list, dict),
    Operation("create_user", ("name", "password"), ("databases",), True,
              "add a user allowed the given databases (default: all)", "create-user"),
    Operation("delete_user", ("name",), (), True, "remove a user", "delete-user"),
)}


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


# --- Answers: what comes back is a guest's, so its shape is checked before anyone uses it ----------

# The largest count a guest may report (prepare deliveries and the like).
MAX_COUNT = 2**31


_TYPE_NAMES: dict[type, str] = {dict: "an object", list: "a list", str: "a string", type(None): "null"}


def _type_name(value: object) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def check_answer(name: str, result: Any) -> Any:
    """A guest-API answer of the documented shape, or Malformed saying in one line what is wrong."""
    op = operation(name)
    if not isinstance(result, (dict, list)) or not isinstance(result, op.answer):
        raise Malformed(f"{name} answered {_type_name(result)}, not {_type_name(op.answer())}")
    if op.items is not None:
        for item in result:
            if not isinstance(item, op.items):
                raise Malformed(f"{name} answered a list holding {_type_name(item)}, not only {_type_name(op.items())}")
    if name == "list_users" and any(not isinstance(u.get("name"), str) for u in result):
        raise Malformed("list_users answered a user without a name")
    return result


def check_count(answer: Mapping[str, Any], name: str) -> int | None:
    """A count the guest reports about itself, if it is a plausible one."""
    value = answer.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_COUNT:
        return None
    return value


def check_pong(result: Any, instance_id: str) -> dict[str, Any] | None:
    """The answer to a ping, if it is one from this instance's own guest (its version one short line)."""
    if not isinstance(result, dict) or result.get("instance_id") != instance_id:
        return None
    return {**result, "version": one_line(result.get("version") or "", 64)}


# What prepare's connection may hold, and of which type; anything else in it is dropped.
CONNECTION_FIELDS: dict[str, type] = {"datastore": str, "host": str, "port": int, "users": list, "databases": list,
                                      "key_prefixes": list}
MAX_CONNECTION_ITEMS = 1000


def check_connection(value: Any) -> dict[str, Any]:
    """Prepare's connection details: the documented fields, of their types, texts one short line each."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Malformed(f"prepare answered a connection that is {_type_name(value)}, not an object")
    clean: dict[str, Any] = {}
    for field, kind in CONNECTION_FIELDS.items():
        item = value.get(field)
        if item is None:
            continue
        if not isinstance(item, kind) or isinstance(item, bool):
            raise Malformed(f"prepare answered a connection whose {field} is {_type_name(item)}")
        if isinstance(item, list):
            if len(item) > MAX_CONNECTION_ITEMS or not all(isinstance(i, str) for i in item):
                raise Malformed(f"prepare answered a connection whose {field} is not a short list of strings")
            item = [one_line(i, 200) for i in item]
        elif isinstance(item, str):
            item = one_line(item, 200)
        clean[field] = item
    if "port" in clean and not 0 < clean["port"] < 65536:
        raise Malformed("prepare answered a connection whose port is out of range")
    return clean
