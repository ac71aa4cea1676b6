"""Who this guest is: its instance, its key (``BERTH_GUEST_KEY``), the messages it has run."""

from __future__ import annotations

import os
from dataclasses import dataclass

from berth.errors import KeyProblem
from berth.keys import GuestKey
from berth.paths import guest_dir
from guest.authn import SpentIds


@dataclass(frozen=True)
class Identity:
    """Who this guest is: its instance, its key, the messages it has run."""

    instance_id: str
    key: GuestKey
    spent: SpentIds


_identity: list[Identity] = []


def identity() -> Identity:
    if not _identity:
        raise RuntimeError("this guest has no identity yet (started without --instance-id?)")
    return _identity[-1]


def load_identity(instance_id: str) -> Identity:
    """This guest's key from BERTH_GUEST_KEY, checked; raises KeyProblem when missing or malformed."""
    text = os.environ.get("BERTH_GUEST_KEY")
    if not text:
        raise KeyProblem(f"BERTH_GUEST_KEY is not set: print the guest's settings with "
                         f"`python -m workflows guest-env {instance_id}`")
    named = os.environ.get("BERTH_INSTANCE_ID")
    if named and named != instance_id:
        raise KeyProblem(f"BERTH_INSTANCE_ID is {named}, not {instance_id}: these are another guest's settings")
    found = Identity(instance_id, GuestKey.from_text(text), SpentIds(guest_dir(instance_id)))
    _identity.append(found)
    return found
