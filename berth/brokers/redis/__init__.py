"""Redis as Berth's broker (kombu's Redis transport), behind the `Broker` interface.

- queues.py: a guest queue is kombu's binding plus a list per priority step;
- acl.py: one Redis ACL user per guest, allowed its own keys by exact name;
- peers.py: where a guest's connections come from, and whether they use TLS;
- unacked.py: every consumer keeps what it takes in an unacknowledged-messages hash of its own,
  and puts back at once what an earlier run of it held.

Redis cannot tell whether anyone consumes a list (`consumers` is None), and has no per-user
quotas (docs/isolation.md).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import redis
from kombu.transport import redis as redis_transport

from berth.brokers.base import Broker, GuestConnection, LiveGuests
from berth.brokers.redis import acl, peers, queues, unacked
from berth.ids import guest_queue, unacked_keys
from berth.redis_server import limit_warnings
from berth.tls import redis_from_url


class RedisBroker(Broker):
    name = "redis"

    def __init__(self, broker_url: str, result_backend: str) -> None:
        self.broker_url, self.result_backend = broker_url, result_backend
        # The run id each server had when its guests' users were last checked (`restore_guests`).
        self._runs: dict[int, str] = {}

    # Clients: decoded for Berth's own keys, bytes for what a guest may have written.

    @functools.cached_property
    def client(self) -> redis.Redis:
        return connect(self.broker_url, decode=True)

    @functools.cached_property
    def raw(self) -> redis.Redis:
        return connect(self.broker_url, decode=False)

    @functools.cached_property
    def results(self) -> redis.Redis:
        return connect(self.result_backend, decode=True)

    @functools.cached_property
    def raw_results(self) -> redis.Redis:
        return connect(self.result_backend, decode=False)

    def _servers(self) -> list[redis.Redis]:
        """The broker, and the result backend when it is another server."""
        return acl.distinct_servers(self.client, self.results)

    # --- Guest queues ------------------------------------------------------------------------------

    def declare_guest_queue(self, instance_id: str) -> None:
        queues.declare(self.client, instance_id)

    def guest_queue_exists(self, instance_id: str) -> bool:
        return queues.exists(self.client, instance_id)

    def purge_guest_queue(self, instance_id: str) -> int:
        return queues.purge(self.client, instance_id)

    def consumers(self, instance_id: str) -> int | None:
        return None

    def queue_empty(self, queue: str) -> bool:
        return queues.nothing_queued(self.client, queue)

    def remove_instance(self, instance_id: str, extra_task_ids: tuple[str, ...] = ()) -> int:
        return queues.remove_instance_keys(self.raw, self.raw_results, instance_id, extra_task_ids)

    # --- Unacknowledged messages -------------------------------------------------------------------

    def forget_guest_unacked(self, instance_id: str) -> None:
        queues.forget_unacked(self.client, instance_id)

    def held_instances(self, nodes: Iterable[str]) -> set[str]:
        return unacked.held_instances(self.client, nodes)

    def use_own_unacked(self, keys: Mapping[str, str]) -> None:
        unacked.use_own_hash(self.broker_url)

    def restore_unacked(self, app: Any, keys: Mapping[str, str]) -> int:
        return unacked.restore(app, keys)

    def consumer_steps(self) -> tuple[type, ...]:
        return (unacked.RestoreOwnUnacked,)

    def bind_guest(self, app: Any, instance_id: str) -> None:
        app.conf.broker_transport_options = {**app.conf.broker_transport_options, **unacked_keys(instance_id)}
        unacked.use_own_hash(app.conf.broker_url)
        _own_queue_lookup(instance_id)

    def guest_connections(self, instance_id: str) -> list[GuestConnection]:
        return [c for server in self._servers() for c in peers.guest_connections(server, instance_id)]

    def release_waits(self, instance_id: str) -> int:
        return peers.release_waits(self.client, instance_id)

    # --- Guest credentials -------------------------------------------------------------------------

    def mint_guest(self, instance_id: str, request_id: str) -> str:
        return acl.mint(instance_id, request_id, self.client, self.results)

    def revoke_guest(self, instance_id: str) -> bool:
        return acl.revoke(instance_id, self.client, self.results)

    def restore_guests(self, live: LiveGuests, everywhere: bool = False) -> list[str]:
        restored: list[str] = []
        for n, server in enumerate(self._servers()):
            run_id = str(server.info("server").get("run_id"))
            if everywhere or run_id != self._runs.get(n):
                restored += acl.restore_missing(server, live(), acl.databases_on(server, self.client, self.results))
                self._runs[n] = run_id
        return restored

    def guest_env(self, instance_id: str, request_id: str) -> dict[str, str]:
        return acl.guest_urls(instance_id, request_id, self.broker_url, self.result_backend)

    def isolation_problem(self) -> str | None:
        return acl.isolation_problem(self.client)

    def limit_warnings(self) -> list[str]:
        return limit_warnings(self.client)


def connect(url: str, *, decode: bool) -> redis.Redis:
    return redis_from_url(url, decode_responses=decode, socket_connect_timeout=2.0, socket_timeout=10.0,
                                health_check_interval=30)


def _own_queue_lookup(instance_id: str) -> None:
    """Put back a message this guest took to its own queue, without reading the queue's bindings.

    kombu looks the queue up in ``_kombu.binding.<exchange>`` when it restores a message; a guest's
    broker user may not read (or write) bindings, and every message it holds came from guest.ID,
    whatever exchange its envelope names.
    """
    name = guest_queue(instance_id)

    def lookup(self: Any, exchange: str, routing_key: str, default: Any = None) -> list[str]:
        return [name]

    redis_transport.Channel._lookup = lookup  # type: ignore[method-assign]


__all__ = ["RedisBroker", "connect"]
