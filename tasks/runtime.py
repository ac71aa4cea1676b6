"""Per-process handles on the broker and on the store (the Redis of records and answers: the broker
itself when it is a Redis, else the result backend), built lazily from the app's settings."""

from __future__ import annotations

import functools
from typing import Any

import redis

from berth.brokers import Broker, broker_for
from berth.config import store_url
from berth.keys import guest_key
from berth.records import Records
from berth.tls import redis_from_url, uses_tls
from tasks.celery_app import app


def taskmanager_queues() -> tuple[str, ...]:
    """The queues a taskmanager consumes, the chains' steps first: on Redis one queue, the steps
    at a lower priority; on RabbitMQ the steps' own queue and the taskmanager queue."""
    return tuple(dict.fromkeys((app.conf.berth_steps_queue, app.conf.task_default_queue)))


def nothing_waiting() -> bool:
    """No message ready in any taskmanager queue: what a step asks before it waits in its slot
    (one round trip when the steps' queue has a backlog, as in a wave)."""
    return all(broker().nothing_ready(queue) for queue in taskmanager_queues())


def store() -> str:
    """The URL of the Redis that holds instance records, heartbeats and dead letters."""
    return store_url(app.conf.broker_url, app.conf.result_backend)


@functools.cache
def redis_client() -> redis.Redis:
    """A decoded client on the store (redis-py reopens its pool after a fork)."""
    return redis_from_url(store(), decode_responses=True,
                                socket_connect_timeout=2.0, health_check_interval=30)


@functools.cache
def result_client() -> redis.Redis:
    """A decoded client on the result backend's Redis."""
    return redis_from_url(app.conf.result_backend, decode_responses=True,
                                socket_connect_timeout=2.0, health_check_interval=30)


@functools.cache
def raw_redis_client() -> redis.Redis:
    """A client on the store that returns bytes: for what a guest may have written."""
    return redis_from_url(store(), socket_connect_timeout=2.0, health_check_interval=30)


@functools.cache
def raw_result_client() -> redis.Redis:
    """A client on the result backend's Redis that returns bytes: guests' answers are read with it."""
    return redis_from_url(app.conf.result_backend, socket_connect_timeout=2.0, health_check_interval=30)


@functools.cache
def broker() -> Broker:
    """This process's broker, behind the seam (berth/brokers)."""
    return broker_for(app.conf.broker_url, app.conf.result_backend, queue_type=app.conf.berth_queue_type,
                      rabbitmq_api=app.conf.berth_rabbitmq_api)


def guest_env(instance_id: str, request_id: str) -> dict[str, str]:
    """What the guest of this instance needs, and nothing more: its broker user and its key, and
    the CA that signed the broker's certificate when it speaks TLS."""
    env = {"BERTH_INSTANCE_ID": instance_id, **broker().guest_env(instance_id, request_id),
           "BERTH_GUEST_KEY": guest_key(instance_id, request_id).text()}
    if app.conf.berth_broker_ca and any(uses_tls(env[name]) for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")):
        env["BERTH_BROKER_CA"] = app.conf.berth_broker_ca
    return env


def records() -> Records:
    return _records()


@functools.cache
def _records() -> Records:
    return Records(redis_client())


def setting(name: str) -> Any:
    """A Berth setting from celeryconfig (``berth_`` prefix implied)."""
    return app.conf[f"berth_{name}"]


def limits() -> dict[str, float]:
    return {k: float(setting(k)) for k in
            ("boot_delay_max_s", "ping_deadline_max_s", "prepare_deadline_max_s")}
