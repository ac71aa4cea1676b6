"""What events, Flower and logs may show of a message: never a password."""

from __future__ import annotations

from typing import Any

from tasks.masking import MASK, holds_secret, masked


def test_passwords_are_masked_and_names_kept() -> None:
    kwargs: dict[str, Any] = {"datastore": "redis", "users": [{"name": "app", "password": "s3cret-pass"}],
                              "databases": ["app"]}
    shown = masked(kwargs)
    assert shown == {"datastore": "redis", "users": [{"name": "app", "password": MASK}], "databases": ["app"]}
    assert kwargs["users"][0]["password"] == "s3cret-pass", "the message itself is untouched"


def test_a_malformed_users_list_is_hidden_whole() -> None:
    assert masked({"users": [["app", "s3cret-pass"]]}) == {"users": MASK}
    assert masked({"users": "app:s3cret-pass"}) == {"users": MASK}
    assert holds_secret({"users": [["app", "s3cret-pass"]]})


def test_nested_passwords_anywhere_are_masked() -> None:
    assert masked([{"a": {"password": "x"}}, ("password",)]) == [{"a": {"password": MASK}}, ["password"]]
    assert holds_secret([{"a": {"password": "x"}}]) and not holds_secret([{"a": "password"}])
