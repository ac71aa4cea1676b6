"""Guests' Redis users: one ACL user per instance, allowed only its own keys.

create_queue mints the user (`mint`); delete revokes it (`revoke`). The password is derived from
the master key (`berth.keys.acl_password`), so it is stored nowhere and a restarted taskmanager
hands out the same one. Redis keeps only its SHA-256. A restarted broker gets the users of live
instances back from the taskmanager (`restore_missing`); a revoke is written to the ACL file at
once (ACL SAVE), so that a deleted guest's user never comes back from it.

What a guest's user may touch (all derived from its instance id, whose fixed format holds no dot
and no glob character, so no pattern reaches another guest's keys):

- its queue ``guest.ID`` and that queue's priority lists ``guest.ID\\x06\\x16N`` for N in 3, 6, 9
  (BRPOP, and LPUSH to put back what it took and never acknowledged);
- its own ack-emulation keys ``unacked.ID``, ``unacked_index.ID``, ``unacked_mutex.ID``;
- results of the tasks sent to it, ``celery-task-meta-ID.guest.*`` (and PUBLISH on that channel):
  task ids of guest-bound messages are ``ID.guest.<name>...``, those of the taskmanager's steps
  are not, so a guest can neither answer for another guest nor forge its own chain's results;
- its dead-letter list ``berth:deadletter:ID``;
- its heartbeat list ``berth:heartbeat:ID`` (RPUSH and LTRIM its own reports; the taskmanager takes
  them, and checks each one's signature too);

each in the broker's and the result backend's databases only (SELECT of any other is refused).
Nothing else: not the taskmanager queue, not the instance records, not the queue bindings (a
guest that could add a binding could make the taskmanager's publishes land in another queue),
not SCAN or KEYS (they would list other instances), not events or remote control. Everything
the control plane reads from those keys it reads as hostile bytes (`berth.untrusted`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import redis

from berth.ids import (
    RESULT_KEY_PREFIX,
    deadletter_key,
    guest_task_prefix,
    heartbeat_key,
    queue_lists,
    unacked_keys,
)
from berth.keys import acl_password

log = logging.getLogger("berth.credentials")

# What kombu's Redis transport, Celery's Redis result backend and the agent itself send, and no more.
GUEST_COMMANDS = (
    # SELECT of the broker's and the result backend's databases only (`acl_rules`): a guest that
    # could select any database could write keys there that no delete would look for.
    "auth", "hello", "ping", "client|setname", "reset",
    # queue: consume, and put back what was taken and never acknowledged
    "brpop", "lpush", "rpush", "llen",
    # ack emulation
    "hset", "hget", "hdel", "hkeys", "hlen", "zadd", "zrem", "zrange", "zrangebyscore", "zcard",
    "set", "get", "del", "expire", "setex", "exists",
    # results
    "publish", "mget",
    # dead letters
    "ltrim", "lrange",
    # pipelines. No scripts: Redis cannot bound a script's run time, and one could stall the broker.
    "multi", "exec", "discard", "watch", "unwatch",
)


def user_name(instance_id: str) -> str:
    return f"guest.{instance_id}"


def key_patterns(instance_id: str, *, queue: bool = True) -> list[str]:
    """Exact names, but for results (their task ids are the taskmanager's to choose): each priority
    list by name, never ``guest.ID\x06\x16*``, which would let a guest make keys of any suffix.
    Without ``queue`` (Redis only as the store beside another broker), no queue or unacked keys."""
    own_queue = [*queue_lists(instance_id), *unacked_keys(instance_id).values()] if queue else []
    return [*own_queue, f"{RESULT_KEY_PREFIX}{guest_task_prefix(instance_id)}*", deadletter_key(instance_id),
            heartbeat_key(instance_id)]


def channel_patterns(instance_id: str) -> list[str]:
    return [f"{RESULT_KEY_PREFIX}{guest_task_prefix(instance_id)}*"]


def acl_rules(instance_id: str, password: str, databases: tuple[int, ...] = (0,), *, queue: bool = True) -> list[str]:
    """ACL SETUSER arguments: only these keys, channels, commands and databases, and this password."""
    return ["reset", "on", f">{password}", "resetkeys", "resetchannels", "-@all",
            *(f"~{p}" for p in key_patterns(instance_id, queue=queue)),
            *(f"&{p}" for p in channel_patterns(instance_id)),
            *(f"+{c}" for c in GUEST_COMMANDS),
            *(f"+select|{db}" for db in databases)]


def _address(client: redis.Redis) -> tuple[Any, ...]:
    kwargs = client.connection_pool.connection_kwargs
    return kwargs.get("host"), kwargs.get("port"), kwargs.get("path")


def distinct_servers(*clients: redis.Redis) -> list[redis.Redis]:
    """The distinct servers among clients (broker and result backend may be one)."""
    seen: dict[tuple[Any, ...], redis.Redis] = {}
    for client in clients:
        seen.setdefault(_address(client), client)
    return list(seen.values())


def databases_on(server: redis.Redis, *clients: redis.Redis) -> tuple[int, ...]:
    """The databases that server and those of clients on the same server use: what a guest may SELECT."""
    return tuple(sorted({int(c.connection_pool.connection_kwargs.get("db") or 0)
                         for c in (server, *clients) if _address(c) == _address(server)}))


def _save(client: redis.Redis) -> None:
    """Persist users to the server's ACL file, if it has one (the embedded broker does)."""
    try:
        client.execute_command("ACL", "SAVE")
    except redis.ResponseError as exc:
        # Nothing to save: without a file, no user survives a restart, a revoked one neither.
        log.debug("broker has no ACL file (%s): nothing to save", exc)


def mint(instance_id: str, request_id: str, *clients: redis.Redis, queue: bool = True) -> str:
    """Create (or reset) the guest's ACL user on the broker and the result backend; its name.

    The user is not written to the broker's ACL file: ACL SAVE rewrites the whole file (63 ms
    with 1,000 users, holding the broker meanwhile; see BENCHMARKS.md). A broker that restarts
    gets its guests' users back from the taskmanager instead (`restore_missing`, run by every
    node when it sees a new broker run); their passwords are derived, so they are the same, and
    a guest that connects in between is refused and retries (kombu counts an authentication
    error as a connection error).
    """
    for server in distinct_servers(*clients):
        _mint_on(server, instance_id, request_id, databases_on(server, *clients), queue=queue)
    return user_name(instance_id)


def _mint_on(server: redis.Redis, instance_id: str, request_id: str, databases: tuple[int, ...], *,
             queue: bool = True) -> None:
    rules = acl_rules(instance_id, acl_password(instance_id, request_id), databases, queue=queue)
    server.execute_command("ACL", "SETUSER", user_name(instance_id), *rules)


def revoke(instance_id: str, *clients: redis.Redis) -> bool:
    """Delete the guest's user (Redis drops its connections too); True if it existed anywhere."""
    found = False
    for client in distinct_servers(*clients):
        if int(client.execute_command("ACL", "DELUSER", user_name(instance_id))):
            found = True
            _save(client)
    return found


def restore_missing(server: redis.Redis, live: Iterable[tuple[str, str]], databases: tuple[int, ...], *,
                    queue: bool = True) -> list[str]:
    """Mint again, on ``server``, the users of ``live`` guests (instance id, request id) it lacks; their ids.

    Guests' users are not saved in an ACL file (`mint`), so a restarted broker, or a restarted
    result backend when it is another server, has none. The passwords are derived, so the same
    users come back and the guests reconnect as before.
    """
    users = {_text(u) for u in server.execute_command("ACL", "USERS")}
    restored = []
    for instance_id, request_id in live:
        if user_name(instance_id) not in users:
            _mint_on(server, instance_id, request_id, databases, queue=queue)
            restored.append(instance_id)
    if restored:
        where = server.connection_pool.connection_kwargs
        log.warning("the server at %s:%s had lost %d guest user(s); minted again: %s", where.get("host"),
                    where.get("port"), len(restored), ", ".join(restored))
    return restored


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


def url_for(url: str, instance_id: str, request_id: str) -> str:
    """``url`` with the guest's user and password instead of the admin's (in the URL or its query)."""
    parts = urlsplit(url)
    host_port = parts.netloc.rpartition("@")[2]
    netloc = f"{quote(user_name(instance_id), safe='')}:{acl_password(instance_id, request_id)}@{host_port}"
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k not in ("username", "password")])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def guest_urls(instance_id: str, request_id: str, broker_url: str, result_backend: str) -> dict[str, str]:
    """The broker and result backend URLs of the guest's own user."""
    return {
        "CELERY_BROKER_URL": url_for(broker_url, instance_id, request_id),
        "CELERY_RESULT_BACKEND": url_for(result_backend, instance_id, request_id),
    }


def isolation_problem(client: redis.Redis) -> str | None:
    """Why guests would not be isolated on this broker, or None."""
    pool = client.connection_pool
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k in ("host", "port", "db", "path")
              or k.startswith("ssl_")}
    probe = redis.Redis(**kwargs, ssl=issubclass(pool.connection_class, redis.SSLConnection),
                        socket_connect_timeout=2.0)
    try:
        probe.ping()
    except redis.AuthenticationError:
        return None
    except redis.ResponseError as exc:
        if "NOAUTH" in str(exc) or "NOPERM" in str(exc):
            return None
        raise
    finally:
        probe.close()
    return ("the broker lets any client in without a password (its default user is open): a guest "
            "could skip its own user and touch every key. Give the default user a password "
            "(the embedded broker does).")
