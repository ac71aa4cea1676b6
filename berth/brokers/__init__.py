"""The broker seam: what Berth asks of its message broker, and nothing of how.

The taskmanager, the guest agent and the command line reach the broker only through a `Broker`
(`broker_for`); everything that knows a broker's internals (how a queue is declared and removed,
where unacknowledged messages sit, how a guest's credentials are made) lives in one package per
broker below this one: `berth.brokers.redis` and `berth.brokers.rabbitmq`. Publishing and
consuming stay Celery's (kombu picks the transport from the URL); this interface is what Celery
does not cover.
"""

from __future__ import annotations

from urllib.parse import urlparse

from amqp.exceptions import RecoverableConnectionError
from kombu.exceptions import OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from berth.brokers.base import Broker, GuestConnection, LiveGuests, hosts_of, transport_of
from berth.brokers.rabbitmq import RabbitBroker
from berth.brokers.rabbitmq.admin import ManagementUnreachable
from berth.brokers.redis import RedisBroker
from berth.config import AMQP_SCHEMES, REDIS_SCHEMES
from berth.errors import UnsupportedBroker

# A broker (or the store) that is away for a moment, on either broker: retried, never a failure of
# the work itself. Not BrokenPipeError: the command line's reader going away is no broker error.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError, RedisTimeoutError, OperationalError, ConnectionRefusedError, ConnectionResetError,
    ConnectionAbortedError, RecoverableConnectionError, ManagementUnreachable)


def broker_for(broker_url: str, result_backend: str, *, queue_type: str = "classic",
               rabbitmq_api: str | None = None) -> Broker:
    """The `Broker` for a Celery broker URL (and the result backend beside it).

    ``queue_type`` and ``rabbitmq_api`` matter to RabbitMQ only (``berth_queue_type``,
    ``berth_rabbitmq_api`` in celeryconfig)."""
    scheme = urlparse(broker_url.split(";")[0]).scheme
    if scheme in REDIS_SCHEMES:
        return RedisBroker(broker_url, result_backend)
    if scheme in AMQP_SCHEMES:
        backend = urlparse(result_backend).scheme
        if backend not in REDIS_SCHEMES:
            raise UnsupportedBroker(f"a RabbitMQ broker needs a Redis result backend (records and guests' "
                                    f"answers live there), got {backend!r}")
        return RabbitBroker(broker_url, result_backend, queue_type=queue_type, api=rabbitmq_api)
    raise UnsupportedBroker(f"no broker implementation for {scheme!r} URLs "
                            f"(served: {', '.join(s + '://' for s in REDIS_SCHEMES + AMQP_SCHEMES)})")


__all__ = ["CONNECTION_ERRORS", "Broker", "GuestConnection", "LiveGuests", "RabbitBroker", "RedisBroker",
           "UnsupportedBroker", "broker_for", "hosts_of", "transport_of"]
