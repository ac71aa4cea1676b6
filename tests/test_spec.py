"""Request validation: one documented id format, and messages that name the bad field."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from berth.ids import INSTANCE_ID_RE, binding_keys, guest_queue, queue_lists, result_key, task_id
from berth.spec import InvalidField, validate_request

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
