"""Idle guests played by asyncio: what a real guest agent sends its broker when it has nothing to do.

A benchmark harness (bench/idle.py), not a product feature. Each fake guest holds the connections
a real agent holds and sends what a real agent sends, read from the guest's own Celery app
(`AgentSettings.of_guest_app`), as a real agent was measured to do (bench/idle.py calibrates it):

- Redis: ``REDIS_CONNECTIONS`` connections as its own ACL user. One loops on kombu's
  ``BRPOP guest.ID guest.ID\\x06\\x163 guest.ID\\x06\\x166 guest.ID\\x06\\x169 <brpop_timeout>``
  (redis-py first sends a PING when the connection was quiet for kombu's ``health_check_interval``);
  one writes the heartbeat reporter's report (guest/heartbeat.py: MULTI, RPUSH of the signed
  envelope, LTRIM to 16, in one round trip) every ``berth_heartbeat_interval_s``; two (kombu's
  pool, the result backend's) stay idle. And every ``HEAL_ANYWAY_S`` (an idle agent's acks all
  went through) the agent's unacked check (berth/brokers/redis/unacked.py: kombu's own sweep is
  off) opens a connection of its own, PINGs, reads its unacked index (ZRANGE BYSCORE) and closes it.
- RabbitMQ: one AMQP connection as its own user with the heartbeat Celery negotiates, one channel,
  ``basic.qos(prefetch_count=1, global=True)``, ``basic.consume`` of ``guest.ID`` with acks; and
  beside it ``STORE_CONNECTIONS_BESIDE_RABBITMQ`` connections to the Redis store (heartbeats, the
  idle result backend).

The first poll, report and unacked check of each guest come at a random point of their interval, as guests
started at different times would. A fake never answers a message: the benchmark pings a real
guest agent among them.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

# Connections one real guest agent holds, counted on the broker (bench/idle.py checks them again
# each run): on Redis, kombu's BRPOP one, kombu's pool (acks, the unacked sweep), the result
# backend, the heartbeat reporter; beside RabbitMQ, the result backend and the reporter.
REDIS_CONNECTIONS = 4
STORE_CONNECTIONS_BESIDE_RABBITMQ = 2
# Tries to connect before a fake guest gives up, a second more apart each time.
CONNECT_ATTEMPTS = 5
# As guest/heartbeat.KEEP_REPORTS.
KEEP_REPORTS = 16


@dataclass(frozen=True)
class AgentSettings:
    """What a real guest agent's idle traffic depends on, as its Celery app configures it."""

    brpop_timeout_s: float
    health_check_interval_s: float
    priority_steps: tuple[int, ...]
    sep: str
    heal_every_s: float
    heal_age_s: float
    heartbeat_interval_s: float
    amqp_heartbeat_s: int

    @classmethod
    def of_guest_app(cls) -> AgentSettings:
        """Read from the guest agent's own app (guest/celery_app.py, celeryconfig.py) and kombu."""
        from kombu.transport import redis as kombu_redis

        from berth.brokers.redis import unacked
        from guest.celery_app import app

        options = dict(app.conf.broker_transport_options or {})
        polling = options.get("polling_interval")
        channel = kombu_redis.Channel
        return cls(
            brpop_timeout_s=float(polling if polling is not None else kombu_redis.Transport.brpop_timeout),
            health_check_interval_s=float(options.get("health_check_interval",
                                                      kombu_redis.DEFAULT_HEALTH_CHECK_INTERVAL)),
            priority_steps=tuple(options.get("priority_steps", channel.priority_steps)),
            sep=str(options.get("sep", channel.sep)),
            heal_every_s=unacked.HEAL_ANYWAY_S,
            heal_age_s=unacked.HEAL_AGE_S,
            heartbeat_interval_s=float(app.conf.berth_heartbeat_interval_s),
            amqp_heartbeat_s=int(app.conf.broker_heartbeat or 0))

    def brpop_keys(self, queue: str) -> list[str]:
        """kombu's `_q_for_pri` for every priority step: the plain list for priority 0."""
        return [queue if pri == 0 else f"{queue}{self.sep}{pri}" for pri in self.priority_steps]


@dataclass(frozen=True)
class GuestSpec:
    """One fake guest: its instance id and what `guest-env` would give it."""

    instance_id: str
    broker_url: str
    store_url: str
    key_text: str


class Switches:
    """What the parent process turns on and off in every fake (multiprocessing events)."""

    def __init__(self, heartbeats: Any, stop: Any) -> None:
        self.heartbeats, self.stop = heartbeats, stop


async def _every(interval_s: float, switches: Switches, action: Any, gated: bool = False) -> None:
    await asyncio.sleep(random.uniform(0, interval_s))
    while not switches.stop.is_set():
        if not gated or switches.heartbeats.is_set():
            try:
                await action()
            except (OSError, aioredis.RedisError):
                pass  # as the agent's reporter and unacked check: the next turn tries again (a broker at maxclients)
        await asyncio.sleep(interval_s)


def _report(instance_id: str, key: Any) -> str:
    """The reporter's envelope (guest/heartbeat.Reporter): the same fields, signed with the guest's key."""
    from berth import __version__

    report = {"instance_id": instance_id, "seq": time.time_ns() // 1000, "sent_at": time.time(),
              "version": __version__, "datastore": "noop", "datastore_status": "running"}
    return json.dumps({"report": report, "mac": key.report_mac(report)})


async def _heartbeat(client: aioredis.Redis, instance_id: str, key: Any) -> None:
    from berth.ids import heartbeat_key

    async with client.pipeline(transaction=False) as pipe:
        pipe.rpush(heartbeat_key(instance_id), _report(instance_id, key))
        pipe.ltrim(heartbeat_key(instance_id), -KEEP_REPORTS, -1)
        await pipe.execute()


def _client(url: str, socket_timeout: float | None = None, **options: Any) -> aioredis.Redis:
    """A client of one connection (a pooled client's pipelines use it too). kombu's and Celery's
    have no socket timeout (redis-py's default is 5 s: a longer BRPOP would fail); the reporter's is 5 s.
    A 10 s connect timeout: thousands of guests connect at once here, not one."""
    return aioredis.Redis.from_url(url, max_connections=1, socket_timeout=socket_timeout, socket_connect_timeout=10.0,
                                   **options)


async def _store_clients(spec: GuestSpec, count: int) -> list[aioredis.Redis]:
    """The idle connections, then the reporter's."""
    clients = [_client(spec.store_url) for _ in range(count - 1)] + [_client(spec.store_url, socket_timeout=5.0)]
    for client in clients:
        await client.ping()
    return clients


async def redis_guest(spec: GuestSpec, settings: AgentSettings, switches: Switches, connected: Any) -> None:
    from berth.ids import guest_queue, unacked_keys
    from berth.keys import GuestKey

    key = GuestKey.from_text(spec.key_text)
    polling = _client(spec.broker_url, health_check_interval=int(settings.health_check_interval_s))
    await polling.ping()
    pool, _backend, reporter = await _store_clients(spec, REDIS_CONNECTIONS - 1)
    connected()
    index = unacked_keys(spec.instance_id)["unacked_index_key"]

    async def heal() -> None:
        client = _client(spec.broker_url)
        await client.ping()
        await client.zrange(index, "-inf", time.time() - settings.heal_age_s, byscore=True)
        await client.aclose()

    keys = settings.brpop_keys(guest_queue(spec.instance_id))
    tasks = [asyncio.create_task(_every(settings.heartbeat_interval_s, switches,
                                        lambda: _heartbeat(reporter, spec.instance_id, key), gated=True)),
             asyncio.create_task(_every(settings.heal_every_s, switches, heal))]
    await asyncio.sleep(random.uniform(0, settings.brpop_timeout_s))
    while not switches.stop.is_set():
        await polling.brpop(keys, timeout=settings.brpop_timeout_s)
    for task in tasks:
        task.cancel()
    for client in (polling, pool, _backend, reporter):
        await client.aclose()


async def rabbit_guest(spec: GuestSpec, settings: AgentSettings, switches: Switches, connected: Any) -> None:
    import aiormq

    from berth.ids import guest_queue
    from berth.keys import GuestKey

    key = GuestKey.from_text(spec.key_text)
    url = f"{spec.broker_url}?heartbeat={settings.amqp_heartbeat_s}"
    connection = await aiormq.connect(url)
    channel = await connection.channel()
    # Celery's worker: prefetch 1 (multiplier 1, solo pool) applied to the whole channel.
    await channel.basic_qos(prefetch_count=1, global_=True)
    await channel.basic_consume(guest_queue(spec.instance_id), _ignore, no_ack=False)
    _backend, reporter = await _store_clients(spec, STORE_CONNECTIONS_BESIDE_RABBITMQ)
    connected()
    beats = asyncio.create_task(_every(settings.heartbeat_interval_s, switches,
                                       lambda: _heartbeat(reporter, spec.instance_id, key), gated=True))
    while not switches.stop.is_set():
        await asyncio.sleep(0.5)
    beats.cancel()
    await connection.close()
    for client in (_backend, reporter):
        await client.aclose()


async def _ignore(message: Any) -> None:
    """A fake takes no task (none is sent to it); it holds the message unacknowledged, as a busy guest would."""


async def serve(specs: list[GuestSpec], settings: AgentSettings, switches: Switches, ready: Any) -> None:
    """Run every spec's fake guest until ``switches.stop``; ``ready`` counts the connected ones."""
    on_rabbitmq = specs[0].broker_url.startswith("amqp") if specs else False
    guest = rabbit_guest if on_rabbitmq else redis_guest
    # Connect a few at a time: a burst of thousands of handshakes at once overruns the accept queue.
    gate = asyncio.Semaphore(50)

    async def one(spec: GuestSpec) -> None:
        await gate.acquire()
        held = [True]

        def connected() -> None:
            held[0] = False
            gate.release()
            ready.put(1)

        try:
            for attempt in range(CONNECT_ATTEMPTS):
                try:
                    return await guest(spec, settings, switches, connected)
                except Exception as exc:
                    # As a real agent does, a guest that could not connect (a busy broker) tries again.
                    if not held[0] or attempt == CONNECT_ATTEMPTS - 1:
                        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}"
                                            for f in reversed(traceback.extract_tb(exc.__traceback__)[-6:]))
                        ready.put(f"{spec.instance_id}: {type(exc).__name__}: {exc} (at {where})")
                        raise
                    await asyncio.sleep(1.0 + attempt)
        finally:
            if held[0]:
                gate.release()

    await asyncio.gather(*(one(spec) for spec in specs), return_exceptions=True)


def serve_process(specs: list[GuestSpec], settings: AgentSettings, switches: Switches, ready: Any) -> None:
    """A child process's main: the fakes of one slice of guests."""
    asyncio.run(serve(specs, settings, switches, ready))
