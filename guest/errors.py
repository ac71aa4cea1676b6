"""The guest agent's errors: one tree, rooted at GuestError."""

from __future__ import annotations


class GuestError(Exception):
    """Root of every error the guest agent raises on purpose."""


class WrongInstance(GuestError):
    """A message meant for another instance reached this guest."""


class InvalidMessage(GuestError):
    """A message whose arguments this guest cannot accept."""


class PrepareError(GuestError):
    """The datastore could not be prepared; the message says why (never a password)."""


class DatastoreError(GuestError):
    pass
