"""RabbitMQ as Berth's broker (kombu's py-amqp transport), behind the `Broker` interface.

- queues.py: ``guest.ID`` is a durable queue (quorum when ``BERTH_QUEUE_TYPE=quorum``) bound to a
  direct exchange of its name, declared, inspected, purged and deleted over AMQP;
- admin.py: users, permissions, limits and connections, through the management HTTP API.

Instance records, guests' answers, heartbeats and dead letters live in Redis, the result backend
(the *store*): a guest's RabbitMQ user may only consume its own queue (read ``^guest\\.ID$``,
configure and write ``^$``, a few connections), and its Redis user on the store may write only
its own answers, heartbeats and dead letters (berth/brokers/redis/acl.py, without queue keys).
A guest publishes nothing on RabbitMQ at all, so it reaches no queue by name through the
default exchange.

RabbitMQ keeps what a consumer took and never acknowledged, and hands it back when the
consumer's connection closes: no unacked bookkeeping of Berth's own is needed here.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

import redis

from berth.brokers.base import Broker, GuestConnection, LiveGuests
from berth.brokers.rabbitmq.admin import ManagementAPI, split_urls
from berth.brokers.rabbitmq.queues import Topology
from berth.brokers.redis import acl, connect, peers
from berth.brokers.redis.queues import remove_instance_keys
from berth.errors import BrokerRefused
from berth.ids import guest_queue
from berth.keys import acl_password
from berth.redis_server import limit_warnings

log = logging.getLogger("berth.credentials")
# A guest agent uses one connection (kombu's consumer; results go to Redis); a reconnect may
# briefly overlap the old one.
GUEST_MAX_CONNECTIONS = 3
GUEST_MAX_CHANNELS = 6


def guest_permissions(instance_id: str) -> dict[str, str]:
    """Consume ``guest.ID`` and nothing else: declare nothing, publish nowhere."""
    return {"configure": "^$", "write": "^$", "read": f"^{re.escape(guest_queue(instance_id))}$"}


class RabbitBroker(Broker):
    name = "rabbitmq"

    def __init__(self, broker_url: str, result_backend: str, *, queue_type: str = "classic",
                 api: str | None = None) -> None:
        self.broker_url, self.result_backend = broker_url, result_backend
        self.topology = Topology(broker_url, queue_type)
        self.admin = ManagementAPI(broker_url, api)
        self._store_run: str | None = None

    @functools.cached_property
    def store(self) -> redis.Redis:
        return connect(self.result_backend, decode=True)

    @functools.cached_property
    def raw_store(self) -> redis.Redis:
        return connect(self.result_backend, decode=False)

    # --- Guest queues ------------------------------------------------------------------------------

    def declare_guest_queue(self, instance_id: str) -> None:
        self.topology.declare(instance_id)

    def guest_queue_exists(self, instance_id: str) -> bool:
        return self.topology.inspect(guest_queue(instance_id)) is not None

    def purge_guest_queue(self, instance_id: str) -> int:
        return self.topology.purge(guest_queue(instance_id))

    def consumers(self, instance_id: str) -> int | None:
        found = self.topology.inspect(guest_queue(instance_id))
        return None if found is None else found[1]

    def queue_empty(self, queue: str) -> bool:
        """No message ready (AMQP, exact) and none unacknowledged (the management API's view, up to
        its statistics interval old, 5 s by default): a retry waiting for its countdown is held
        unacknowledged by a worker."""
        found = self.topology.inspect(queue)
        if found is None:
            return True
        if found[0]:
            return False
        stats = self.admin.queue(queue) or {}
        return not int(stats.get("messages_unacknowledged") or 0)

    def nothing_ready(self, queue: str) -> bool:
        """No message ready (AMQP, exact; one round trip, no management API call)."""
        found = self.topology.inspect(queue)
        return found is None or not found[0]

    def remove_instance(self, instance_id: str, extra_task_ids: tuple[str, ...] = ()) -> int:
        removed = int(self.topology.remove(instance_id))
        return removed + remove_instance_keys(self.raw_store, self.raw_store, instance_id, extra_task_ids)

    # --- Unacknowledged messages: RabbitMQ's own -------------------------------------------------

    def forget_guest_unacked(self, instance_id: str) -> None:
        """Close the guest's connections: what it held goes back to its queue, then is purged."""
        if self.admin.close_connections(acl.user_name(instance_id)):
            self.purge_guest_queue(instance_id)

    def held_instances(self, nodes: Iterable[str]) -> set[str]:
        return set()  # `queue_empty` counts unacknowledged messages: nothing is held when it is True

    def use_own_unacked(self, keys: Mapping[str, str]) -> None:
        return None

    def restore_unacked(self, app: Any, keys: Mapping[str, str]) -> int:
        return 0  # RabbitMQ requeues them itself when the consumer's connection closes

    def consumer_steps(self) -> tuple[type, ...]:
        return ()

    def bind_guest(self, app: Any, instance_id: str) -> None:
        return None

    def guest_connections(self, instance_id: str) -> list[GuestConnection]:
        """Its AMQP connections (the management API's view), then its connections to the store."""
        amqp = [GuestConnection(str(c.get("peer_host") or "?"), bool(c.get("ssl")))
                for c in self.admin.connections_by(acl.user_name(instance_id))]
        return amqp + peers.guest_connections(self.store, instance_id)

    # --- Guest credentials -------------------------------------------------------------------------

    def mint_guest(self, instance_id: str, request_id: str) -> str:
        name = acl.user_name(instance_id)
        self.admin.put_user(name, acl_password(instance_id, request_id), **guest_permissions(instance_id),
                            max_connections=GUEST_MAX_CONNECTIONS, max_channels=GUEST_MAX_CHANNELS)
        acl.mint(instance_id, request_id, self.store, queue=False)
        return name

    def revoke_guest(self, instance_id: str) -> bool:
        name = acl.user_name(instance_id)
        existed = self.admin.delete_user(name)
        # Deleting a user leaves its open connections: close them, so it consumes nothing more.
        self.admin.close_connections(name)
        return acl.revoke(instance_id, self.store) or existed

    def restore_guests(self, live: LiveGuests, everywhere: bool = False) -> list[str]:
        """RabbitMQ keeps its users across restarts (and replicates them in a cluster); the store,
        a Redis, may have lost its ACL users: those are minted again as on a Redis broker."""
        restored: list[str] = []
        run_id = str(self.store.info("server").get("run_id"))
        if everywhere or run_id != self._store_run:
            databases = acl.databases_on(self.store, self.store)
            restored += acl.restore_missing(self.store, live(), databases, queue=False)
            self._store_run = run_id
        if everywhere:
            users = self.admin.user_names()
            for instance_id, request_id in live():
                if acl.user_name(instance_id) not in users:
                    self.mint_guest(instance_id, request_id)
                    restored.append(instance_id)
        return restored

    def guest_env(self, instance_id: str, request_id: str) -> dict[str, str]:
        urls = [acl.url_for(u, instance_id, request_id) for u in split_urls(self.broker_url)]
        return {"CELERY_BROKER_URL": ";".join(urls),
                "CELERY_RESULT_BACKEND": acl.url_for(self.result_backend, instance_id, request_id),
                "BERTH_QUEUE_TYPE": self.topology.queue_type}

    def isolation_problem(self) -> str | None:
        try:
            tags = self.admin.whoami().get("tags")
        except BrokerRefused as exc:
            return (f"the broker URL's RabbitMQ user {self.admin.user!r} may not use the management API ({exc}): "
                    "it lacks the administrator tag, and cannot create guests' users and permissions")
        except Exception as exc:  # noqa: BLE001 - reported as the problem it is
            return (f"the RabbitMQ management API does not answer ({exc}): guests' users cannot be made; "
                    "enable the rabbitmq_management plugin or set BERTH_RABBITMQ_API")
        tag_list = tags if isinstance(tags, list) else str(tags or "").split(",")
        if "administrator" not in tag_list:
            return (f"the broker URL's RabbitMQ user {self.admin.user!r} lacks the administrator tag: it cannot "
                    "create guests' users and permissions")
        return acl.isolation_problem(self.store)

    def limit_warnings(self) -> list[str]:
        warnings = limit_warnings(self.store)
        try:
            warnings += [f"RabbitMQ alarm set ({a}): publishers are blocked" for a in self.admin.alarms()]
        except Exception as exc:  # noqa: BLE001 - a warning, not a failure
            warnings.append(f"could not read RabbitMQ's alarms: {exc}")
        return warnings


__all__ = ["RabbitBroker", "guest_permissions"]
