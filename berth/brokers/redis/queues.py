"""Guest queues on Redis, as kombu's Redis transport keeps them: declared, checked, purged, removed.

On Redis a queue is a list per priority step plus kombu's binding sets; `declare` writes the
binding (the list appears with the first message), `exists` reads it back.
"""

from __future__ import annotations

import redis

from berth.ids import (
    RESULT_KEY_PREFIX,
    binding_keys,
    binding_member,
    deadletter_key,
    heartbeat_key,
    kombu_lists,
    queue_lists,
    result_key,
    secrets_key,
    unacked_keys,
)


def declare(client: redis.Redis, instance_id: str) -> None:
    """Create ``guest.ID`` durably on the broker. Idempotent.

    For kombu's Redis transport a queue is its binding: the member ``guest.ID\x06\x16\x06\x16guest.ID``
    of the set ``_kombu.binding.guest.ID`` (its exchange has the queue's name; kombu's
    ``queue_bind`` writes exactly this, and publishing looks it up there). It is written here
    directly, in one round trip on the broker's Redis (``client``), rather than with kombu's
    declare: that needs a connection, and a new connection per declare was a tenth of the
    taskmanager's time in a wave, while a pooled one remembers the queues it bound and skips
    writing a binding that delete has removed since (an id provisioned again would then have no
    queue).
    """
    client.sadd(binding_keys(instance_id)[0], binding_member(instance_id))


def exists(client: redis.Redis, instance_id: str) -> bool:
    return bool(client.sismember(binding_keys(instance_id)[0], binding_member(instance_id)))


def purge(client: redis.Redis, instance_id: str) -> int:
    """Drop the messages still waiting in the queue (the queue itself stays declared).

    The guest may have made any of its lists something else: such a key is deleted all the same,
    and counts no message.
    """
    with client.pipeline() as pipe:
        for name in queue_lists(instance_id):
            pipe.llen(name)
            pipe.delete(name)
        replies = pipe.execute(raise_on_error=False)
    return sum(n for n in replies[::2] if isinstance(n, int))


def forget_unacked(client: redis.Redis, instance_id: str) -> None:
    """Drop what the guest took and never acknowledged, so a restarted guest does not restore it."""
    keys = unacked_keys(instance_id)
    client.delete(keys["unacked_key"], keys["unacked_index_key"])


def instance_key_names(instance_id: str) -> list[str]:
    """The instance's keys with fixed names, except its record: its queue (every priority list), the
    queue's bindings, its guest's unacked keys, its secrets, its dead letters and heartbeats."""
    return [*queue_lists(instance_id), *binding_keys(instance_id), *unacked_keys(instance_id).values(),
            secrets_key(instance_id), deadletter_key(instance_id), heartbeat_key(instance_id)]


def result_keys(client: redis.Redis, instance_id: str) -> list[bytes]:
    """Every stored result whose task id names the instance, as the key's bytes.

    Task ids start with ``<id>.`` and ids hold no dot, so ``db-1`` never matches ``db-10``'s.
    ``client`` returns bytes: a guest may store results under any bytes after its prefix, and
    such a name must neither stop the scan nor be missed by it.
    """
    return [bytes(k) for k in client.scan_iter(match=f"{RESULT_KEY_PREFIX}{instance_id}.*", count=1000)]


def _databases(*clients: redis.Redis) -> list[redis.Redis]:
    """One client per distinct server and database among clients."""
    seen: dict[tuple[object, ...], redis.Redis] = {}
    for client in clients:
        kwargs = client.connection_pool.connection_kwargs
        seen.setdefault((kwargs.get("host"), kwargs.get("port"), kwargs.get("path"), kwargs.get("db") or 0), client)
    return list(seen.values())


def remove_instance_keys(broker: redis.Redis, results: redis.Redis, instance_id: str,
                         extra_task_ids: tuple[str, ...] = ()) -> int:
    """Delete every key of the instance but its record (and extra_task_ids' results); how many.

    In each database its guest may select (the broker's and the result backend's: its user may
    select no other) every key that guest could have written goes, whatever its type or the
    bytes of its name. Both clients return bytes (`result_keys`).
    """
    removed = 0
    for client in _databases(broker, results):
        keys: list[str | bytes] = [*instance_key_names(instance_id), *(result_key(t) for t in extra_task_ids)]
        keys += result_keys(client, instance_id)
        removed += int(client.delete(*keys))
    return removed


def nothing_queued(client: redis.Redis, queue: str) -> bool:
    """True when no message waits in the queue, at any priority (one round trip)."""
    with client.pipeline(transaction=False) as pipe:
        for name in kombu_lists(queue):
            pipe.llen(name)
        return not any(pipe.execute())
