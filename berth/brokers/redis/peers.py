"""Where a guest's connections to a Redis come from, and whether they use TLS, as Redis sees them.

``CLIENT LIST`` names each connection's user, its peer (``addr``) and, from Redis 6.2, the local
address it reached (``laddr``): a connection is TLS when that port is the server's ``tls-port``
(a server may listen in the clear and over TLS at once). Before 6.2 there is no ``laddr``, and
whether a connection uses TLS is unknown.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis

from berth.brokers.base import GuestConnection
from berth.brokers.redis.acl import user_name


def _port(address: str) -> int:
    """The port of ``host:port`` (``addr`` and ``laddr``; an IPv6 host holds colons too)."""
    return int(address.rsplit(":", 1)[1])


def peer(entry: Mapping[str, Any], tls_port: int) -> GuestConnection:
    """One ``CLIENT LIST`` entry as a guest connection; ``tls_port`` 0: the server serves no TLS."""
    host = str(entry["addr"]).rsplit(":", 1)[0]
    local = entry.get("laddr")
    if not local:
        return GuestConnection(host, None)
    return GuestConnection(host, tls_port > 0 and _port(str(local)) == tls_port)


def tls_port(server: redis.Redis) -> int:
    """The server's TLS port; 0 when it serves none (or was built without TLS)."""
    return _tls_port_of(server.config_get("tls-port"))


def _tls_port_of(config: Mapping[Any, Any]) -> int:
    """The TLS port in a ``CONFIG GET tls-port`` answer."""
    return int(config.get("tls-port") or 0)


def guest_connections(server: redis.Redis, instance_id: str) -> list[GuestConnection]:
    """The connections of the instance's guest user to ``server``."""
    user = user_name(instance_id)
    with server.pipeline(transaction=False) as pipe:  # one round trip
        pipe.config_get("tls-port")
        pipe.client_list()
        config, entries = pipe.execute()
    port = _tls_port_of(config)
    return [peer(entry, port) for entry in entries if entry.get("user") == user]


def release_waits(server: redis.Redis, instance_id: str) -> int:
    """CLIENT UNBLOCK each blocked read (a BRPOP on its queue) of the instance's guest user: the
    read returns nil, as at its timeout, so the guest takes no message it would not process."""
    user = user_name(instance_id)
    blocked = [entry["id"] for entry in server.client_list()
               if entry.get("user") == user and "b" in str(entry.get("flags", ""))]
    return sum(1 for client_id in blocked if server.client_unblock(int(client_id)))
