"""RabbitMQ's management HTTP API, as the taskmanager's administrator user calls it.

Users, permissions, limits and connections are managed only through this API (AMQP has no
verbs for them). The address is ``BERTH_RABBITMQ_API`` (one URL, or several separated by commas
for a cluster: each is tried in turn), else ``http://HOST:15672`` for each host of the broker URL.
The credentials are the broker URL's own. A refusal (401, 403, a missing API) raises
`berth.errors.BrokerRefused` naming the call and what the broker said; an API that cannot be
reached raises ``OSError`` (a connection error, retried like any other).

Calls reuse one kept-alive HTTP connection per address, thread and process (a new TCP connection
per call cost a handshake each, several per provisioning); every call is idempotent (GET, PUT,
DELETE), so one that meets a connection the server closed meanwhile is sent again on a new one.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import threading
import time
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from berth.errors import BrokerRefused

DEFAULT_API_PORT = 15672


class ManagementUnreachable(ConnectionError):
    """No address of the management API answered (a node restarting, say): retried like a broker error."""

TIMEOUT_S = 10.0
# How long the ports of the nodes' TLS listeners are trusted before they are read again.
LISTENERS_TTL_S = 60.0


def split_urls(broker_url: str) -> list[str]:
    """The URLs of a failover list (``amqp://a;amqp://b``)."""
    return [u.strip() for u in broker_url.split(";") if u.strip()]


def vhost_of(url: str) -> str:
    """The vhost an AMQP URL names: ``/`` for an empty path or ``//``."""
    path = urlsplit(url).path
    vhost = unquote(path[1:]) if path.startswith("/") else unquote(path)
    return vhost or "/"


def api_urls(broker_url: str, configured: str | None) -> list[str]:
    if configured:
        return [u.strip().rstrip("/") for u in configured.split(",") if u.strip()]
    return [f"http://{urlsplit(u).hostname or '127.0.0.1'}:{DEFAULT_API_PORT}" for u in split_urls(broker_url)]


def connection_ends(name: str) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
    """((peer host, port), (broker address, port)) of a connection named ``PEER:PORT -> ADDRESS:PORT``
    (an IPv6 address may come in brackets); None for an end that name does not give."""
    def end(text: str) -> tuple[str, int] | None:
        host, _, port = text.strip().rpartition(":")
        return (host.strip("[]"), int(port)) if host and port.isdigit() else None

    peer, arrow, local = name.partition(" -> ")
    return end(peer), (end(local) if arrow else None)


class ManagementAPI:
    def __init__(self, broker_url: str, configured: str | None = None) -> None:
        first = urlsplit(split_urls(broker_url)[0])
        self.user = unquote(first.username or "guest")
        self._password = unquote(first.password or "guest")
        self.vhost = vhost_of(split_urls(broker_url)[0])
        self.bases = api_urls(broker_url, configured)
        self._listeners: tuple[float, dict[str, set[int]]] = (0.0, {})
        self._local = threading.local()

    def _vh(self) -> str:
        return quote(self.vhost, safe="")

    def _connection(self, base: str, fresh: bool) -> http.client.HTTPConnection:
        """This thread's kept-alive connection to ``base`` (a new one after a fork, or if ``fresh``)."""
        pid = os.getpid()
        if getattr(self._local, "pid", None) != pid:
            self._local.pid, self._local.connections = pid, {}  # a parent's connections are not ours
        connections: dict[str, http.client.HTTPConnection] = self._local.connections
        conn = connections.get(base)
        if conn is None or fresh:
            if conn is not None:
                conn.close()
            parts = urlsplit(base)
            kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
            conn = kind(parts.hostname or "127.0.0.1", parts.port, timeout=TIMEOUT_S)
            connections[base] = conn
        return conn

    def _request(self, base: str, method: str, path: str, data: bytes | None,
                 headers: dict[str, str]) -> tuple[int, bytes]:
        """(status, body) of one request on the kept-alive connection; once more on a new one if the
        server had closed it (the calls are idempotent)."""
        prefix = urlsplit(base).path.rstrip("/")
        for fresh in (False, True):
            conn = self._connection(base, fresh)
            try:
                conn.request(method, prefix + path, body=data, headers=headers)
                response = conn.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, http.client.CannotSendRequest, http.client.BadStatusLine,
                    BrokenPipeError, ConnectionResetError) as exc:
                conn.close()
                if fresh:
                    raise OSError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
            except (OSError, http.client.HTTPException):
                conn.close()
                raise
        raise AssertionError("unreachable")

    def call(self, method: str, path: str, body: Any = None, *, missing_ok: bool = False) -> Any:
        """One API call, on the first address that answers; the decoded JSON (None for 204/404)."""
        token = base64.b64encode(f"{self.user}:{self._password}".encode()).decode()
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Basic {token}", "content-type": "application/json"}
        last: OSError | None = None
        for base in self.bases:
            try:
                status, raw = self._request(base, method, path, data, headers)
            except (OSError, http.client.HTTPException) as exc:
                last = exc if isinstance(exc, OSError) else OSError(f"{type(exc).__name__}: {exc}")
                continue
            if status < 300:
                return json.loads(raw) if raw else None
            if status == 404 and missing_ok:
                return None
            if status >= 500:
                last = OSError(f"HTTP {status} from {base}")  # a node going down: try the next one
                continue
            reason = raw[:300].decode("utf-8", "replace")
            raise BrokerRefused(f"RabbitMQ management API refused {method} {path} "
                                f"as user {self.user!r}: HTTP {status} {reason}")
        raise ManagementUnreachable(f"RabbitMQ management API unreachable at {', '.join(self.bases)}: {last}")

    # --- Users -------------------------------------------------------------------------------------

    def put_user(self, name: str, password: str, *, read: str, write: str = "^$", configure: str = "^$",
                 max_connections: int, max_channels: int) -> None:
        """Create or reset a user with no tags, these permissions on the vhost, and these limits."""
        user = quote(name, safe="")
        self.call("PUT", f"/api/users/{user}", {"password": password, "tags": ""})
        self.call("PUT", f"/api/permissions/{self._vh()}/{user}",
                  {"configure": configure, "write": write, "read": read})
        # No topic permission: the user may publish nowhere, so no routing key is needed either.
        self.call("PUT", f"/api/user-limits/{user}/max-connections", {"value": max_connections})
        self.call("PUT", f"/api/user-limits/{user}/max-channels", {"value": max_channels})

    def delete_user(self, name: str) -> bool:
        """Delete a user (its permissions and limits go with it); True if it existed."""
        existed = self.call("GET", f"/api/users/{quote(name, safe='')}", missing_ok=True) is not None
        self.call("DELETE", f"/api/users/{quote(name, safe='')}", missing_ok=True)
        return existed

    def user_names(self) -> set[str]:
        return {str(u["name"]) for u in self.call("GET", "/api/users?columns=name") or []}

    def permissions(self, name: str) -> dict[str, str] | None:
        answer = self.call("GET", f"/api/permissions/{self._vh()}/{quote(name, safe='')}", missing_ok=True)
        return None if answer is None else {k: str(answer[k]) for k in ("configure", "write", "read")}

    def close_connections(self, user: str) -> int:
        """Close every connection of ``user`` (what it holds unacknowledged goes back to its queue);
        how many it had. Exact: the broker's connection tracking, not the statistics database, so a
        connection opened a moment ago is closed too."""
        found = len(self.connections_by(user))
        if found:
            self.call("DELETE", f"/api/connections/username/{quote(user, safe='')}", missing_ok=True)
        return found

    def connections_of(self, user: str) -> int:
        return len(self.connections_by(user))

    def connections_by(self, user: str) -> list[dict[str, Any]]:
        """The AMQP connections of ``user`` now, each with its ``peer_host`` and ``ssl`` (True for TLS).

        From the broker's connection tracking (``/api/connections/username/USER``: every node, at
        once, one call whatever the number of guests), not from ``/api/connections``, which lists
        what the statistics database has collected: up to its collection interval late, and every
        connection of every guest. A tracked connection is named ``PEER:PORT -> ADDRESS:PORT``; it
        uses TLS when that address and port are one of its node's ``amqp/ssl`` listeners.
        """
        tracked = self.call("GET", f"/api/connections/username/{quote(user, safe='')}", missing_ok=True) or []
        found = []
        for conn in tracked:
            peer, local = connection_ends(str(conn.get("name") or ""))
            found.append({"user": conn.get("user"), "node": conn.get("node"), "name": conn.get("name"),
                          "peer_host": peer[0] if peer else None,
                          "ssl": None if local is None else local[1] in self.tls_ports(str(conn.get("node")))})
        return found

    def tls_ports(self, node: str) -> set[int]:
        """The ports of ``node``'s AMQP-over-TLS listeners. They change only when a node restarts
        with another configuration: read again at most every ``LISTENERS_TTL_S``, and at once for
        a node not seen yet."""
        now = time.monotonic()
        seen_at, known = self._listeners
        if node not in known or now - seen_at > LISTENERS_TTL_S:
            known = {}
            for listener in (self.call("GET", "/api/overview?columns=listeners") or {}).get("listeners") or []:
                ports = known.setdefault(str(listener.get("node")), set())
                if listener.get("protocol") == "amqp/ssl":
                    ports.add(int(listener.get("port")))
            self._listeners = (now, known)
        return known.get(node, set())

    def whoami(self) -> dict[str, Any]:
        return dict(self.call("GET", "/api/whoami") or {})

    # --- Queues ------------------------------------------------------------------------------------

    def queue(self, name: str) -> dict[str, Any] | None:
        answer = self.call("GET", f"/api/queues/{self._vh()}/{quote(name, safe='')}", missing_ok=True)
        return None if answer is None else dict(answer)

    def queue_names(self, prefix: str) -> list[str]:
        return [str(q["name"]) for q in self.call("GET", f"/api/queues/{self._vh()}?columns=name") or []
                if str(q["name"]).startswith(prefix)]

    def exchange_names(self, prefix: str) -> list[str]:
        return [str(e["name"]) for e in self.call("GET", f"/api/exchanges/{self._vh()}?columns=name") or []
                if str(e["name"]).startswith(prefix)]

    def alarms(self) -> list[str]:
        """Memory or disk alarms on any node (publishers are blocked while one is set)."""
        found = []
        for node in self.call("GET", "/api/nodes") or []:
            for alarm in ("mem_alarm", "disk_free_alarm"):
                if node.get(alarm):
                    found.append(f"{node.get('name')}: {alarm}")
        return found
