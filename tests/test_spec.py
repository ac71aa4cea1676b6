"""Request validation: one documented id format, and messages that name the bad field."""

from __future__ import annotations

import fnmatch
import json
import re
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from berth.errors import InvalidField
from berth.ids import (
    INSTANCE_ID_RE,
    RESULT_KEY_PREFIX,
    binding_keys,
    binding_member,
    deadletter_key,
    guest_queue,
    ping_task_id,
    prepare_task_id,
    queue_lists,
    record_key,
    result_key,
    secrets_key,
    step_task_id,
    task_id,
    unacked_keys,
)
from berth.spec import MAX_REQUEST_BYTES, check_instance_id, validate_request

LIMITS = {"boot_delay_max_s": 600.0, "ping_deadline_max_s": 1800.0, "prepare_deadline_max_s": 1800.0}


def request(instance_id: Any = "db-1", **fields: Any) -> Any:
    fields.setdefault("ping_deadline_s", 10)
    fields.setdefault("prepare_deadline_s", 10)
    return validate_request(instance_id, limits=LIMITS, **fields)


@pytest.mark.parametrize("good", ["db-1", "a", "db-10", "x" * 40, "a1-b2-c3"])
def test_well_formed_ids_are_accepted(good: str) -> None:
    assert request(good).instance_id == good


@pytest.mark.parametrize("bad", ["", "db-1\n", "\ndb-1", "DB-1", "1db", "db-", "db.1", "db_1", "db 1", "x" * 41,
                                 "guest.db-1", "db-1*", "db/1", None, 7, ["db-1"]])
def test_malformed_ids_are_refused_with_the_field_named(bad: Any) -> None:
    with pytest.raises(InvalidField) as info:
        request(bad)
    assert info.value.field == "instance_id"
    assert "expected 1-40 characters" in str(info.value)


@given(st.text(max_size=60))
def test_an_id_is_accepted_exactly_when_it_matches_the_documented_format(text: str) -> None:
    expected = re.fullmatch(r"[a-z]([a-z0-9-]{0,38}[a-z0-9])?", text) is not None
    try:
        request(text)
        accepted = True
    except InvalidField:
        accepted = False
    assert accepted == expected


@given(st.from_regex(INSTANCE_ID_RE, fullmatch=True), st.from_regex(INSTANCE_ID_RE, fullmatch=True))
def test_no_key_of_one_instance_starts_with_another_instances_task_prefix(a: str, b: str) -> None:
    # Task ids are '<id>.<step>': a prefix match 'celery-task-meta-<a>.' must never hit b's keys.
    if a != b:
        assert not result_key(task_id(b, "prepare")).startswith(result_key(f"{a}."))
        assert guest_queue(a) not in queue_lists(b)


def test_queue_keys_cover_every_priority_list_and_binding() -> None:
    assert queue_lists("db-1") == ["guest.db-1", "guest.db-1\x06\x163", "guest.db-1\x06\x166", "guest.db-1\x06\x169"]
    assert binding_keys("db-1") == ["_kombu.binding.guest.db-1", "_kombu.binding_permanent.guest.db-1"]


@pytest.mark.parametrize(("fields", "field"), [
    ({"datastore": "mysql"}, "datastore"),
    ({"boot": "cloud"}, "boot"),
    ({"boot_delay_s": -1}, "boot_delay_s"),
    ({"ping_deadline_s": 0}, "ping_deadline_s"),
    ({"ping_deadline_s": "soon"}, "ping_deadline_s"),
    ({"prepare_deadline_s": 1e9}, "prepare_deadline_s"),
    ({"users": [{"name": "1x", "password": "longenough"}]}, "users[0].name"),
    ({"users": [{"name": "default", "password": "longenough"}]}, "users[0].name"),
    ({"users": [{"name": "app", "password": "short"}]}, "users[0].password"),
    ({"users": [{"name": "app", "password": "has space in it"}]}, "users[0].password"),
    ({"users": [{"name": "app"}]}, "users[0]"),
    ({"users": "app"}, "users"),
    ({"databases": ["Bad-Name"]}, "databases[0]"),
    ({"databases": ["a", "a"]}, "databases"),
    ({"datastore": "redis", "config": {"save": "60"}}, "config.save"),
    ({"datastore": "noop", "config": {"prepare_seconds": -3}}, "config.prepare_seconds"),
])
def test_each_bad_field_is_named_in_the_error(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidField) as info:
        request(**fields)
    assert info.value.field == field


def test_a_refused_password_is_never_quoted_in_the_error() -> None:
    with pytest.raises(InvalidField) as info:
        request(users=[{"name": "app", "password": "no good secret"}])
    assert "no good secret" not in str(info.value)


def test_public_view_of_a_request_has_no_password() -> None:
    spec = request(users=[{"name": "app", "password": "s3cret-pass"}], databases=["app"])
    assert "s3cret-pass" not in repr(spec.public()) and "s3cret-pass" not in repr(spec)
    assert spec.task_kwargs()["users"] == [{"name": "app", "password": "s3cret-pass"}]


# --- Properties -------------------------------------------------------------------------------

FIELDS = ("instance_id", "datastore", "boot", "boot_delay_s", "ping_deadline_s", "prepare_deadline_s", "users",
          "databases", "config")
JSON_LIKE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=20), inner, max_size=5),
    max_leaves=25)
# Closer to what each field expects, so that the checks past the first are reached too.
NEAR_MISSES: dict[str, st.SearchStrategy[Any]] = {
    "instance_id": st.from_regex(INSTANCE_ID_RE, fullmatch=True) | st.text(alphabet="ab-1.\n", max_size=42),
    "datastore": st.sampled_from(["redis", "noop", "Redis", "", "mysql"]),
    "boot": st.sampled_from(["local", "none", "cloud"]),
    "boot_delay_s": st.floats() | st.integers(-5, 10**400),
    "ping_deadline_s": st.floats() | st.integers(-5, 10**400),
    "prepare_deadline_s": st.floats() | st.integers(-5, 10**400),
    "users": st.lists(st.fixed_dictionaries({"name": st.from_regex(r"[A-Za-z][a-z0-9_-]{0,33}", fullmatch=True)
                                             | st.sampled_from(["default", "app"]) | JSON_LIKE,
                                             "password": st.text(max_size=130) | JSON_LIKE}), max_size=18),
    "databases": st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,33}", fullmatch=True) | JSON_LIKE, max_size=18),
    "config": st.dictionaries(st.sampled_from(["maxmemory", "maxmemory-policy", "prepare_seconds", "fail", "save"])
                              | st.text(max_size=10), JSON_LIKE | st.text(max_size=210), max_size=4),
}


def request_fields(**fields: Any) -> dict[str, Any]:
    """Every field validate_request encodes, with the defaults `request` uses."""
    base: dict[str, Any] = {"instance_id": "db-1", "datastore": "noop", "boot": "local", "boot_delay_s": 0.0,
                            "ping_deadline_s": 10, "prepare_deadline_s": 10, "users": (), "databases": (),
                            "config": None}
    return {**base, **fields}


def validate(fields: dict[str, Any]) -> Any:
    values = dict(fields)
    return validate_request(values.pop("instance_id"), limits=LIMITS, **values)


@given(st.text(max_size=60) | st.from_regex(INSTANCE_ID_RE, fullmatch=True))
def test_check_instance_id_accepts_exactly_the_documented_pattern(text: str) -> None:
    if INSTANCE_ID_RE.fullmatch(text):
        assert check_instance_id(text) == text
    else:
        with pytest.raises(InvalidField) as info:
            check_instance_id(text)
        assert info.value.field == "instance_id"


@given(st.none() | st.integers() | st.floats() | st.binary(max_size=10) | st.lists(st.text(max_size=5), max_size=2))
def test_check_instance_id_refuses_what_is_not_text(value: Any) -> None:
    with pytest.raises(InvalidField) as info:
        check_instance_id(value)
    assert info.value.field == "instance_id"


@settings(max_examples=300)
@given(st.sampled_from(FIELDS).flatmap(lambda name: st.tuples(st.just(name), JSON_LIKE | NEAR_MISSES[name])),
       st.sampled_from(["noop", "redis"]))
def test_any_json_value_in_any_field_is_accepted_or_refused_naming_that_field(
        named: tuple[str, Any], datastore: str) -> None:
    name, value = named
    fields = {**request_fields(datastore=datastore), name: value}
    try:
        validate(fields)
    except InvalidField as exc:  # anything else (TypeError, OverflowError, ...) fails the test
        if exc.field == "request":
            assert len(json.dumps(fields)) > MAX_REQUEST_BYTES
        else:
            assert exc.field.startswith(name), (exc.field, name)


@given(st.sampled_from(FIELDS),
       st.binary(max_size=8) | st.sets(st.text(max_size=3), max_size=3) | st.builds(object)
       | st.integers(min_value=10**5000, max_value=10**5000 + 1) | st.just(float("nan")))
def test_values_json_cannot_hold_are_refused_naming_their_field(name: str, value: Any) -> None:
    with pytest.raises(InvalidField) as info:
        validate(request_fields(**{name: value}))
    assert info.value.field.startswith(name)


def test_values_json_cannot_encode_at_all_are_refused_naming_their_field() -> None:
    looped: list[Any] = []
    looped.append(looped)
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    for name, value in (("users", looped), ("config", {"fail": deep}), ("ping_deadline_s", 10**5000)):
        with pytest.raises(InvalidField) as info:
            validate(request_fields(**{name: value}))
        assert info.value.field == name
        assert "cannot be encoded as JSON" in str(info.value)


@settings(max_examples=40)
@given(st.sampled_from(["instance_id", "datastore", "boot", "users", "databases", "config"]),
       st.integers(0, 3 * MAX_REQUEST_BYTES))
def test_an_oversized_request_is_refused_before_any_field_is_checked(name: str, extra: int) -> None:
    filler = "x" * (MAX_REQUEST_BYTES + extra)
    value: Any = {"instance_id": filler, "datastore": filler, "boot": filler,
                  "users": [{"name": "app", "password": filler}], "databases": [filler],
                  "config": {"fail": filler}}[name]
    fields = request_fields(**{name: value})
    size = len(json.dumps(fields))
    with pytest.raises(InvalidField) as info:
        validate(fields)
    assert info.value.field == "request"
    assert str(info.value) == f"request: {size} bytes, at most {MAX_REQUEST_BYTES}"


def test_the_size_limit_is_inclusive_and_counts_passwords() -> None:
    users = [{"name": "app", "password": "p" * 100}]
    bare = len(json.dumps(request_fields(users=users, databases=[""])))
    at_limit = request_fields(users=users, databases=["x" * (MAX_REQUEST_BYTES - bare)])
    assert len(json.dumps(at_limit)) == MAX_REQUEST_BYTES
    with pytest.raises(InvalidField) as info:
        validate(at_limit)
    assert info.value.field == "databases[0]", "at the limit, the fields are checked"
    over = request_fields(users=[{"name": "app", "password": "p" * 101}], databases=at_limit["databases"])
    with pytest.raises(InvalidField) as info:
        validate(over)
    assert info.value.field == "request", "one more byte of password is one too many"


VALID_IDS = st.from_regex(INSTANCE_ID_RE, fullmatch=True)


@given(VALID_IDS, VALID_IDS, st.text(max_size=20), st.text(max_size=20), st.integers(0, 10**6))
def test_no_name_derived_from_one_id_can_be_read_as_another_ids(a: str, b: str, request_id: str, step: str,
                                                                 attempt: int) -> None:
    assume(a != b)
    task_ids = [step_task_id(a, request_id, step), ping_task_id(a, request_id, attempt),
                prepare_task_id(a, request_id), task_id(a, step)]
    for tid in task_ids:
        assert tid.startswith(f"{a}.")
        assert not tid.startswith(f"{b}.")
        assert not result_key(tid).startswith(f"{RESULT_KEY_PREFIX}{b}.")
        # The pattern berth.brokers.redis.queues.result_keys scans for b's results.
        assert not fnmatch.fnmatchcase(result_key(tid), f"{RESULT_KEY_PREFIX}{b}.*")

    def names(i: str) -> set[str]:
        return {*queue_lists(i), *binding_keys(i), binding_member(i), *unacked_keys(i).values(), record_key(i),
                secrets_key(i), deadletter_key(i)}

    assert names(a).isdisjoint(names(b))
