"""Passwords never shown, never plain; messages to guests signed: all at a message's creation.

Celery shows a message's ``argsrepr``/``kwargsrepr`` in events (``task-sent``, ``task-received``),
Flower and logs. They are computed when the message is built, before any publish signal, so
masking happens here, in the app's AMQP class: every process that loads the taskmanager app
(the taskmanager, `celery -A tasks call`, `python -m workflows`, Flower's send-task API)
publishes masked representations.

In the same place, every password a message carries is sealed (`berth.keys.seal_at_rest`, or
for a guest by the taskmanager with that guest's key), so that no queue, no AOF and no
unacknowledged-message hash holds one in plaintext; and a message to a guest published inside
`signing_for` gets its signature header (see `berth.keys.GuestKey.sign` and guest/authn.py).

On RabbitMQ every task message is also published ``mandatory`` and waits at most
``confirm_timeout`` for its publisher confirm (celeryconfig): a nack, an unroutable message or a
confirm that never comes raises instead of passing for sent.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

from celery.app.amqp import AMQP
from celery.utils.saferepr import saferepr

from berth.config import on_rabbitmq
from berth.errors import InvalidRequest
from berth.keys import SIGNATURE_HEADER, GuestKey, is_sealed, seal_at_rest

MASK = "********"
SECRET_KEYS = frozenset({"password", "users"})
# As long as Celery's own representations get.
REPR_MAX = 1024


def _masked_users(users: Any) -> Any:
    """Users keep their names; anything not shaped like [{name, password}] is hidden whole."""
    if isinstance(users, (list, tuple)) and all(isinstance(u, dict) for u in users):
        return [{k: (MASK if k == "password" else masked(v)) for k, v in u.items()} for u in users]
    return MASK


def masked(value: Any) -> Any:
    """A copy of value with every password (and any malformed users list) replaced by a mask."""
    if isinstance(value, dict):
        return {k: MASK if k == "password" else _masked_users(v) if k == "users" else masked(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [masked(v) for v in value]
    return value


def holds_secret(value: Any) -> bool:
    if isinstance(value, dict):
        return bool(SECRET_KEYS & set(value)) or any(holds_secret(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(holds_secret(v) for v in value)
    return False


def sealed(value: Any) -> Any:
    """A copy of value with every plaintext password sealed with the at-rest key."""
    if isinstance(value, dict):
        return {k: seal_at_rest(v) if k == "password" and isinstance(v, str) and not is_sealed(v)
                else sealed(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(sealed(v) for v in value)
    return value


_signing: contextvars.ContextVar[tuple[str, GuestKey] | None] = contextvars.ContextVar("berth_signing", default=None)


@contextlib.contextmanager
def signing_for(instance_id: str, key: GuestKey) -> Iterator[None]:
    """Messages created inside this block are signed for the guest of instance_id."""
    token = _signing.set((instance_id, key))
    try:
        yield
    finally:
        _signing.reset(token)


# Tasks taking a password, and how many positional arguments they accept before it: a password
# by position would be neither masked nor sealed, so such a message is refused before it is built.
POSITIONAL_LIMITS = {"workflows.create_user": 2, "guest.create_user": 1}


class MaskingAMQP(AMQP):
    def _create_task_sender(self) -> Any:
        send = super()._create_task_sender()
        conf = self.app.conf
        if not on_rabbitmq(conf):
            return send
        confirm_timeout = (conf.broker_transport_options or {}).get("confirm_timeout")

        def send_confirmed(producer: Any, name: str, message: Any, **options: Any) -> Any:
            options.setdefault("mandatory", True)
            if options.get("confirm_timeout") is None:
                options["confirm_timeout"] = confirm_timeout
            return send(producer, name, message, **options)
        return send_confirmed

    def as_task_v2(self, task_id: str, name: str, args: Any = None, kwargs: Any = None,
                   *rest: Any, **options: Any) -> Any:
        limit = POSITIONAL_LIMITS.get(name)
        if limit is not None and len(args or ()) > limit:
            raise InvalidRequest("args", f"{name} takes at most {limit} positional argument(s); give the password "
                                         "as a keyword (--kwargs '{\"password\": ...}'): keywords are masked and "
                                         "sealed, positions are not. Nothing was sent")
        if holds_secret(args) or holds_secret(kwargs):
            options["argsrepr"] = saferepr(masked(list(args or ())), maxlen=REPR_MAX)
            options["kwargsrepr"] = saferepr(masked(dict(kwargs or {})), maxlen=REPR_MAX)
            args, kwargs = sealed(args), sealed(kwargs)
        message = super().as_task_v2(task_id, name, args, kwargs, *rest, **options)
        signing = _signing.get()
        if signing is not None:
            instance_id, key = signing
            message.headers[SIGNATURE_HEADER] = key.sign(instance_id=instance_id, headers=message.headers,
                                                         body=list(message.body))
        return message
