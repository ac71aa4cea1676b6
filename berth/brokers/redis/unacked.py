"""Messages a consumer took and never acknowledged go back to their queue without waiting an hour.

kombu's Redis transport emulates acks: a delivered message sits in an ``unacked`` hash until it
is acknowledged, and any consumer puts it back once it is older than the visibility timeout
(an hour here, because a prepare may legitimately run for half of that). Berth gives every
consumer its own hash instead (a guest: ``unacked.<id>``; a taskmanager node:
``unacked.node.<name>``), and exactly one process owns each. Then everything in a consumer's
hash that it is not working on right now was in flight when an earlier run of it died
(SIGKILL, power loss) or when its broker connection broke, and it can be put back at once:
when the consumer (re)connects, not an hour later.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import redis
from celery import Celery, bootsteps
from celery.worker import state
from kombu.transport import redis as redis_transport
from kombu.transport.virtual import QoS as virtual_QoS  # noqa: N812 - kombu's own name, kept apart

from berth.ids import REQUEST_TASKS, SHARED_UNACKED_KEY, instance_of, node_unacked_keys
from berth.tls import redis_from_url

log = logging.getLogger("berth.unacked")
# How often a consumer checks its own hash for messages it no longer holds, and how long one
# must have been there: longer than any gap between taking a message and holding it. The check
# runs only after an acknowledgement could not be written (see `OwnHashQoS._settle`), or at the
# latest every HEAL_ANYWAY_S: an idle guest opens no connection for it every 10 s.
HEAL_INTERVAL_S = 10.0
HEAL_AGE_S = 30.0
HEAL_ANYWAY_S = 600.0
# When an ack or requeue last failed to be written (0: none since the last check).
_unsettled = {"last": 0.0}


def restore(app: Celery, transport_options: Mapping[str, Any] | None = None,
            keep: Collection[str] = (), older_than_s: float = 0.0) -> int:
    """Put messages of one consumer's unacked hash back on their queue, except ``keep``.

    ``transport_options`` name the hash (default: the app's); ``older_than_s`` leaves the
    messages taken more recently than that. Return how many went back.
    """
    with app.connection_for_write(transport_options=dict(transport_options or {})) as conn:
        conn.ensure_connection(max_retries=None, interval_start=0.5, interval_step=0.5, interval_max=2.0)
        channel = conn.default_channel
        client = channel.client
        if older_than_s > 0:
            found = client.zrange(channel.unacked_index_key, "-inf", time.time() - older_than_s, byscore=True)
        else:
            found = client.hkeys(channel.unacked_key)
        tags = [tag for tag in (t.decode() if isinstance(t, bytes) else str(t) for t in found) if tag not in keep]
        for tag in tags:
            channel.qos.restore_by_tag(tag, client=client)
    return len(tags)


def _tags_in_hand() -> set[str]:
    """Delivery tags of the messages this worker holds: running, waiting for a slot, or for their ETA."""
    tags = set()
    for requests in (state.active_requests, state.reserved_requests, state.scheduled_requests):
        for request in list(requests):
            tag = getattr(getattr(request, "message", None), "delivery_tag", None)
            if tag is not None:
                tags.add(str(tag))
    return tags


class OwnHashQoS(redis_transport.QoS):
    """kombu's Redis QoS for a consumer whose unacked hash is its own (see the module docstring).

    - A channel closing leaves its in-flight messages in the hash: kombu's own restore on
      close fails inside kombu once the broker connection is gone, and stops the worker.
    - An ack for a message delivered on a channel that has closed since (the broker went away
      while the task ran) still removes it from the hash, through a client of its own,
      instead of failing inside kombu and stopping the worker.
    - An ack that cannot be written at all still releases the prefetch slot (see `_settle`).
    """

    restore_at_shutdown = False
    broker_url: str | None = None

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        """Nothing: `RestoreOwnUnacked` puts back whatever this consumer does not hold, sooner.

        kombu's own sweep (messages older than the visibility timeout) takes a lock that is a Lua
        script; a guest's broker user may run no script (one could stall the broker).
        """

    def ack(self, delivery_tag: str) -> None:
        self._settle(delivery_tag, lambda: self._remove_from_indices(delivery_tag, self._pipe()).execute())

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            self._settle(delivery_tag, lambda: self.restore_by_tag(delivery_tag, client=self._client(), leftmost=True))
        else:
            self.ack(delivery_tag)

    def _client(self) -> Any:
        if self.channel.connection is None and self.broker_url:
            return redis_from_url(self.broker_url, socket_connect_timeout=2.0)
        return None

    def _pipe(self) -> Any:
        client = self._client()
        return client.pipeline() if client is not None else None

    def _settle(self, delivery_tag: str, write: Callable[[], Any]) -> None:
        """Write the ack (or requeue) to the hash, then forget the message in memory, always.

        If the broker is away the entry stays in the hash and `RestoreOwnUnacked.heal` puts it
        back later (a repeat, never a loss); kombu would keep counting it against the prefetch
        limit instead, and the consumer would never take another message.
        """
        try:
            write()
        except (redis.ConnectionError, redis.TimeoutError, AttributeError) as exc:
            _unsettled["last"] = time.monotonic()
            log.warning("could not settle message %s (%s): it stays in the unacked hash and is "
                        "restored later", delivery_tag, exc)
        virtual_QoS.ack(self, delivery_tag)


def use_own_hash(broker_url: str) -> None:
    """Make this process's Redis channels use `OwnHashQoS` (call before the consumer connects)."""
    OwnHashQoS.broker_url = broker_url
    redis_transport.Channel.QoS = OwnHashQoS


class RestoreOwnUnacked(bootsteps.StartStopStep):
    """Consumer step: give back what this consumer's hash holds and it does not.

    At every (re)connection, everything it does not hold goes back: that was lost with the
    previous connection or the previous run. Then, once an ack or a requeue could not be written
    (the only way a message is left behind while connected), whatever it has not held for
    ``HEAL_AGE_S`` goes back too, checked every ``HEAL_INTERVAL_S``; without one, every
    ``HEAL_ANYWAY_S``. Only for consumers with their own hash: with the shared one,
    others' messages are in it.
    """

    requires = ("celery.worker.consumer.connection:Connection",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.tref: Any = None
        self.checked_at = time.monotonic()

    def _own_hash(self, c: Any) -> str | None:
        options = c.app.conf.broker_transport_options or {}
        key = options.get("unacked_key", SHARED_UNACKED_KEY)
        return None if key == SHARED_UNACKED_KEY else str(key)

    def start(self, c: Any) -> None:
        key = self._own_hash(c)
        if key is None:
            return
        restored = restore(c.app, keep=_tags_in_hand())
        if restored:
            log.warning("restored %d message(s) taken earlier by %s and never acknowledged", restored, key)
        if self.tref is None:
            self.tref = c.timer.call_repeatedly(HEAL_INTERVAL_S, self.heal, (c,), priority=10)

    def heal(self, c: Any) -> None:
        unsettled = _unsettled["last"]
        due = unsettled and time.monotonic() - unsettled > HEAL_AGE_S
        if not due and time.monotonic() - self.checked_at < HEAL_ANYWAY_S:
            return
        self.checked_at = time.monotonic()
        try:
            restored = restore(c.app, keep=_tags_in_hand(), older_than_s=HEAL_AGE_S)
            if due:  # every failure so far is older than HEAL_AGE_S: its message was put back
                _unsettled["last"] = 0.0
        except Exception:  # noqa: BLE001 - the broker may be away; the next round tries again
            log.warning("could not check %s for stranded messages", self._own_hash(c), exc_info=True)
            return
        if restored:
            log.warning("restored %d stranded message(s) from %s", restored, self._own_hash(c))

    def stop(self, c: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None


def held_instances(client: redis.Redis, nodes: Iterable[str]) -> set[str]:
    """The instances of which a taskmanager node holds a message, taken and not yet acknowledged."""
    hashes = [SHARED_UNACKED_KEY, *(node_unacked_keys(node)["unacked_key"] for node in nodes)]
    held = set()
    for key in hashes:
        for raw in client.hvals(key):
            instance_id = _instance_of(raw)
            if instance_id:
                held.add(instance_id)
    return held


def _instance_of(raw: Any) -> str | None:
    """The instance a message in kombu's unacked hash (``[payload, exchange, routing key]``) is for."""
    try:
        payload = json.loads(raw)[0]
        headers = payload["headers"]
        if headers.get("task") in REQUEST_TASKS:
            body = payload["body"]
            if payload.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            args, kwargs, _ = json.loads(body)
            found = args[0] if args else kwargs.get("instance_id")
        else:
            found = instance_of(str(headers["id"]))  # a step's id: <instance>.<step>.<request>
    except (ValueError, LookupError, TypeError, AttributeError):
        return None
    return found if isinstance(found, str) else None
