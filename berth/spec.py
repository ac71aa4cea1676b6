"""What a provisioning request may contain, validated the same way at every entry point.

The CLI, the `workflows.provision` task, `provision_chain()` and `taskmanager.create_queue`
all call `validate_request`; the guest re-checks what reaches it. Messages name the field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from berth.errors import InvalidField
from berth.ids import INSTANCE_ID_FORMAT, INSTANCE_ID_RE

DATASTORES: dict[str, frozenset[str]] = {
    # datastore -> configuration keys it accepts
    "redis": frozenset({"maxmemory", "maxmemory-policy"}),
    "noop": frozenset({"prepare_seconds", "fail"}),
}
BOOT_DRIVERS = ("local", "netns", "none")

# Patterns are used with fullmatch (a trailing newline is not allowed).
USER_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")
DATABASE_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
# Printable ASCII without spaces: safe in an ACL rule and in a shell command line.
PASSWORD_RE = re.compile(r"[\x21-\x7e]{8,128}")
CONFIG_VALUE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_USERS = 16
MAX_DATABASES = 16
MAX_FAIL_MESSAGE = 200
# A request is refused when its JSON encoding (every field, passwords included) is longer than
# this, before any field is looked at: a valid one is a few KiB at most.
MAX_REQUEST_BYTES = 16384
RESERVED_USER_NAMES = frozenset({"default", "berth-admin"})


@dataclass(frozen=True)
class User:
    name: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class ProvisionRequest:
    instance_id: str
    datastore: str
    boot: str
    boot_delay_s: float
    ping_deadline_s: float
    prepare_deadline_s: float
    users: tuple[User, ...]
    databases: tuple[str, ...]
    config: Mapping[str, Any]

    def task_kwargs(self) -> dict[str, Any]:
        """The request as JSON-serialisable keyword arguments (passwords included)."""
        data = asdict(self)
        data["users"] = [{"name": u.name, "password": u.password} for u in self.users]
        data["databases"] = list(self.databases)
        data["config"] = dict(self.config)
        return data

    def public(self) -> dict[str, Any]:
        """The request without passwords: what may be logged, shown or stored."""
        data = self.task_kwargs()
        data["users"] = [u.name for u in self.users]
        return data


def check_instance_id(value: object) -> str:
    if not isinstance(value, str) or not INSTANCE_ID_RE.fullmatch(value):
        raise InvalidField("instance_id", f"{value!r} is not valid: expected {INSTANCE_ID_FORMAT}")
    return value


def check_choice(name: str, value: object, choices: Any) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InvalidField(name, f"unknown {name} {value!r}: expected one of {', '.join(sorted(choices))}")
    return value


def check_seconds(name: str, value: object, *, low: float, high: float, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidField(name, f"{value!r} is not a number of seconds")
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond every float (not quoted: it can be thousands of digits)
        raise InvalidField(name, f"too large a number: out of range ({low:g} to {high:g} s)") from None
    if not math.isfinite(seconds):
        raise InvalidField(name, f"{value!r} is not a number of seconds")
    if seconds < low or seconds > high or (seconds == 0 and not allow_zero):
        raise InvalidField(name, f"{seconds:g} s is out of range ({low:g} to {high:g} s)")
    return seconds


def check_user_name(value: object, field: str) -> str:
    if not isinstance(value, str) or not USER_NAME_RE.fullmatch(value) or value in RESERVED_USER_NAMES:
        raise InvalidField(field, f"{value!r} is not a valid user name (letter first, then "
                           "letters, digits, '_' or '-', at most 32; not 'default' or 'berth-admin')")
    return value


def check_password(value: object, field: str) -> str:
    # Never echo the password itself: this message may reach a log.
    if not isinstance(value, str) or not PASSWORD_RE.fullmatch(value):
        raise InvalidField(field, "must be 8-128 printable ASCII characters without spaces")
    return value


def check_database_name(value: object, field: str) -> str:
    if not isinstance(value, str) or not DATABASE_NAME_RE.fullmatch(value):
        raise InvalidField(field, f"{value!r} is not a valid database name "
                           "(lowercase letter first, then lowercase letters, digits or '_', at most 32)")
    return value


def check_user(value: object, index: int) -> User:
    where = f"users[{index}]"
    if not isinstance(value, Mapping) or set(value) != {"name", "password"}:
        raise InvalidField(where, "expected an object with exactly 'name' and 'password'")
    return User(check_user_name(value["name"], f"{where}.name"), check_password(value["password"], f"{where}.password"))


def check_users(value: object) -> tuple[User, ...]:
    if not isinstance(value, (list, tuple)):
        raise InvalidField("users", "expected a list of {name, password} objects")
    if len(value) > MAX_USERS:
        raise InvalidField("users", f"at most {MAX_USERS} users")
    users = tuple(check_user(item, i) for i, item in enumerate(value))
    names = [u.name for u in users]
    if len(set(names)) != len(names):
        raise InvalidField("users", "user names must be unique")
    return users


def check_databases(value: object) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise InvalidField("databases", "expected a list of database names")
    if len(value) > MAX_DATABASES:
        raise InvalidField("databases", f"at most {MAX_DATABASES} databases")
    for i, name in enumerate(value):
        check_database_name(name, f"databases[{i}]")
    if len(set(value)) != len(value):
        raise InvalidField("databases", "database names must be unique")
    return tuple(value)


def check_config(datastore: str, value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidField("config", "expected an object")
    allowed = DATASTORES[datastore]
    for key, item in value.items():
        if key not in allowed:
            raise InvalidField(f"config.{key}", f"not a setting of the {datastore} datastore "
                               f"(accepted: {', '.join(sorted(allowed))})")
        if key == "prepare_seconds":
            check_seconds("config.prepare_seconds", item, low=0, high=600, allow_zero=True)
        elif key == "fail":
            if not isinstance(item, str) or not 0 < len(item) <= MAX_FAIL_MESSAGE:
                raise InvalidField("config.fail", f"expected a message of 1-{MAX_FAIL_MESSAGE} characters")
        elif not isinstance(item, str) or not CONFIG_VALUE_RE.fullmatch(item):
            raise InvalidField(f"config.{key}", "expected a short word (letters, digits, '_', '.', '-')")
    return dict(value)


def _json_default(value: object) -> object:
    """What the size check counts for a value JSON has no type for (the field checks refuse most)."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (set, frozenset)):
        return list(value)
    if isinstance(value, (bytes, bytearray)):
        return value.decode("latin-1")
    return None


def check_size(fields: Mapping[str, object]) -> None:
    """Refuse a request whose JSON encoding ({"field": value, ...}) exceeds MAX_REQUEST_BYTES.

    Each field is encoded on its own, so a value that cannot be encoded at all (an int of
    thousands of digits, a cycle, nesting past the recursion limit) is refused naming its field.
    """
    total = 2 + 2 * max(0, len(fields) - 1)  # the braces, and ", " between members
    for name, value in fields.items():
        try:
            encoded = json.dumps(value, default=_json_default, skipkeys=True)
        except Exception as exc:  # noqa: BLE001 - whatever JSON cannot encode is the field's fault
            raise InvalidField(name, f"cannot be encoded as JSON ({type(exc).__name__})") from None
        total += len(json.dumps(name)) + 2 + len(encoded)  # "name": value
    if total > MAX_REQUEST_BYTES:
        raise InvalidField("request", f"{total} bytes, at most {MAX_REQUEST_BYTES}")


def validate_request(
    instance_id: object,
    *,
    datastore: object = "noop",
    boot: object = "local",
    boot_delay_s: object = 0.0,
    ping_deadline_s: object,
    prepare_deadline_s: object,
    users: object = (),
    databases: object = (),
    config: object = None,
    limits: Mapping[str, float],
) -> ProvisionRequest:
    """Check every field of a provisioning request; raise InvalidField naming the first bad one.

    ``limits`` holds the upper bounds from the settings (berth_*_max_s). The request's size is
    checked first (MAX_REQUEST_BYTES, field ``request``), so a huge one costs one encoding.
    """
    check_size({"instance_id": instance_id, "datastore": datastore, "boot": boot, "boot_delay_s": boot_delay_s,
                "ping_deadline_s": ping_deadline_s, "prepare_deadline_s": prepare_deadline_s, "users": users,
                "databases": databases, "config": config})
    store = check_choice("datastore", datastore, DATASTORES)
    return ProvisionRequest(
        instance_id=check_instance_id(instance_id),
        datastore=store,
        boot=check_choice("boot", boot, BOOT_DRIVERS),
        boot_delay_s=check_seconds("boot_delay_s", boot_delay_s, low=0,
                                   high=limits["boot_delay_max_s"], allow_zero=True),
        ping_deadline_s=check_seconds("ping_deadline_s", ping_deadline_s, low=0.1,
                                      high=limits["ping_deadline_max_s"]),
        prepare_deadline_s=check_seconds("prepare_deadline_s", prepare_deadline_s, low=0.1,
                                         high=limits["prepare_deadline_max_s"]),
        users=check_users(users),
        databases=check_databases(databases),
        config=check_config(store, config),
    )
