"""The broker seam: what Berth asks of its message broker, and nothing of how.

The taskmanager, the guest agent and the command line reach the broker only through a `Broker`
(`broker_for`); everything that knows a broker's internals (how a queue is declared and removed,
where unacknowledged messages sit, how a guest's credentials are made) lives in one package per
broker below this one: `berth.brokers.redis`. Publishing and consuming stay Celery's (kombu picks
the transport from the URL); this interface is what Celery does not cover.
"""

from __future__ import annotations

from urllib.parse import urlparse

from berth.brokers.base import Broker, LiveGuests
from berth.brokers.redis import RedisBroker
from berth.errors import UnsupportedBroker


def broker_for(broker_url: str, result_backend: str) -> Broker:
    """The `Broker` for a Celery broker URL (and the result backend beside it)."""
    scheme = urlparse(broker_url).scheme
    if scheme in ("redis", "rediss"):
        return RedisBroker(broker_url, result_backend)
    raise UnsupportedBroker(f"no broker implementation for {scheme!r} URLs (redis:// and rediss:// are served)")


__all__ = ["Broker", "LiveGuests", "RedisBroker", "UnsupportedBroker", "broker_for"]
