"""Settings that are safe only together, checked at start-up.

Each rule names the settings in conflict and why the combination could lose or repeat work.
The taskmanager refuses to start and the command line refuses to send on any violation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from berth.errors import UnsafeSettings
from berth.tls import hosts_of, is_loopback, uses_tls

REDIS_SCHEMES = ("redis", "rediss")
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")
QUEUE_TYPES = ("classic", "quorum")
# A prepare must be long finished before Redis hands its message to another consumer.
VISIBILITY_MARGIN_S = 60.0
# The longest retry countdown of a chain step after a broker error (tasks.taskmanager.Step).
STEP_RETRY_BACKOFF_MAX_S = 10.0
# Every deadline a message may have to live through while unacknowledged.
DEADLINES = ("prepare_deadline_max_s", "ping_deadline_max_s", "delete_ping_deadline_s", "shutdown_deadline_s",
             "chain_stop_wait_s")


def _transport(conf: Mapping[str, Any]) -> Mapping[str, Any]:
    return conf.get("broker_transport_options") or {}


def scheme_of(url: str) -> str:
    """The scheme of a broker URL (of its first part, for a failover list ``a;b``)."""
    return urlparse(str(url or "").split(";")[0]).scheme


def on_rabbitmq(conf: Mapping[str, Any]) -> bool:
    return scheme_of(str(conf.get("broker_url") or "")) in AMQP_SCHEMES


def store_url(broker_url: str, result_backend: str) -> str:
    """The Redis that holds instance records, heartbeats and dead letters: the broker when it is a
    Redis, else the result backend (beside RabbitMQ)."""
    return broker_url if scheme_of(broker_url) in REDIS_SCHEMES else result_backend


def _backend_problems(conf: Mapping[str, Any]) -> list[str]:
    problems = []
    broker = scheme_of(str(conf.get("broker_url") or ""))
    if broker not in REDIS_SCHEMES + AMQP_SCHEMES:
        problems.append(f"broker_url must be a Redis or RabbitMQ URL (redis://, rediss://, amqp://, amqps://), "
                        f"got scheme {broker!r}")
    backend = scheme_of(str(conf.get("result_backend") or ""))
    if backend not in REDIS_SCHEMES:
        problems.append(f"result_backend must be a Redis URL (redis:// or rediss://), got scheme {backend!r}: "
                        "instance records and guests' answers are read from Redis")
    if broker in AMQP_SCHEMES:
        problems += _rabbitmq_problems(conf)
    if _transport(conf).get("global_keyprefix"):
        problems.append("broker_transport_options.global_keyprefix is not supported: per-guest keys "
                        "are named without it")
    return problems


def _rabbitmq_problems(conf: Mapping[str, Any]) -> list[str]:
    problems = []
    transport = _transport(conf)
    if not transport.get("confirm_publish"):
        problems.append("broker_transport_options.confirm_publish must be on with RabbitMQ: without publisher "
                        "confirms a publish the broker never stored looks sent, and a prepare is lost silently")
    timeout = transport.get("confirm_timeout")
    if timeout is None or not 0 < float(timeout) <= 60:
        problems.append(f"broker_transport_options.confirm_timeout ({timeout!r}) must be between 0 and 60 s: "
                        "without one a publish may wait for its confirm forever")
    if not conf.get("task_acks_late") or not conf.get("task_reject_on_worker_lost"):
        problems.append("task_acks_late and task_reject_on_worker_lost must be on: a step taken by a worker "
                        "that dies must go back to its queue")
    queue_type = str(conf.get("berth_queue_type") or "")
    if queue_type not in QUEUE_TYPES:
        problems.append(f"berth_queue_type (BERTH_QUEUE_TYPE) must be one of {', '.join(QUEUE_TYPES)}, "
                        f"got {queue_type!r}")
    return problems


def _visibility_problems(conf: Mapping[str, Any]) -> list[str]:
    if on_rabbitmq(conf):
        return []  # RabbitMQ hands a message to another consumer only when the first one's connection closes
    problems = []
    visibility = float(_transport(conf).get("visibility_timeout", 3600))
    deadlines = {name: float(conf.get(f"berth_{name}", 0.0)) for name in DEADLINES}
    longest_name, longest = max(deadlines.items(), key=lambda item: item[1])
    if visibility < longest + VISIBILITY_MARGIN_S:
        problems.append(f"visibility_timeout ({visibility:g} s, BERTH_VISIBILITY_TIMEOUT_S) must exceed the "
                        f"longest deadline ({longest:g} s, BERTH_{longest_name.upper()}) "
                        f"by {VISIBILITY_MARGIN_S:g} s, or a slow prepare is handed to a second consumer while "
                        "the first still runs it")
    for prefix in ("ping", "verify"):
        cap = float(conf[f"berth_{prefix}_backoff_cap_s"])
        if cap * 10 > visibility:
            problems.append(f"berth_{prefix}_backoff_cap_s ({cap:g} s) must stay far below visibility_timeout "
                            f"({visibility:g} s): a retry waiting for its countdown is an unacknowledged message")
        if cap <= 0 or float(conf[f"berth_{prefix}_backoff_base_s"]) <= 0:
            problems.append(f"berth_{prefix}_backoff_base_s and _cap_s must be positive")
    return problems


def _timing_problems(conf: Mapping[str, Any]) -> list[str]:
    problems = []
    longest_countdown = max(float(conf["berth_ping_backoff_cap_s"]), float(conf["berth_verify_backoff_cap_s"]),
                            STEP_RETRY_BACKOFF_MAX_S)
    stop_wait = float(conf.get("berth_chain_stop_wait_s", 0.0))
    if stop_wait < 2 * longest_countdown:
        problems.append(f"berth_chain_stop_wait_s ({stop_wait:g} s, BERTH_CHAIN_STOP_WAIT_S) must be at least twice "
                        f"the longest countdown of a chain step ({longest_countdown:g} s): delete would remove an "
                        "instance's keys before its interrupted chain stopped, and the chain's last result would "
                        "outlive the delete")
    stall = float(conf.get("berth_stall_after_s", 0.0))
    if stall < 2 * longest_countdown:
        problems.append(f"berth_stall_after_s ({stall:g} s, BERTH_STALL_AFTER_S) must be at least twice the longest "
                        f"countdown of a chain step ({longest_countdown:g} s): chains that are only waiting would be "
                        "resumed a second time over and over")
    if float(conf.get("berth_node_lease_s", 0.0)) < 1.0:
        problems.append("berth_node_lease_s (BERTH_NODE_LEASE_S) must be at least 1 s: a node renews its lease "
                        "every third of it")
    interval = float(conf.get("berth_heartbeat_interval_s", 10.0))
    expiry = float(conf.get("berth_heartbeat_expiry_s", 35.0))
    if interval <= 0 or expiry < 2 * interval:
        problems.append(f"berth_heartbeat_expiry_s ({expiry:g} s, BERTH_HEARTBEAT_EXPIRY_S) must be at least twice "
                        f"berth_heartbeat_interval_s ({interval:g} s, BERTH_HEARTBEAT_INTERVAL_S), which must be "
                        "positive: one late heartbeat would mark a healthy guest UNKNOWN")
    expires = float(conf.get("result_expires") or 0)
    needed = float(conf["berth_ping_deadline_max_s"]) + float(conf["berth_prepare_deadline_max_s"])
    if 0 < expires < needed:
        problems.append(f"result_expires ({expires:g} s, BERTH_RESULT_EXPIRES_S) must outlive a whole build "
                        f"({needed:g} s of ping and prepare deadlines), or a guest's answer expires unread")
    return problems


def cleartext_problems(conf: Mapping[str, Any]) -> list[str]:
    """A connection off loopback must be TLS: it carries broker passwords and prepare's secrets."""
    if conf.get("berth_allow_cleartext"):
        return []
    problems = []
    for setting in ("broker_url", "result_backend"):
        url = str(conf.get(setting) or "")
        remote = sorted({host for host in hosts_of(url) if host and not is_loopback(host)})
        if remote and not uses_tls(url):
            problems.append(f"{setting} reaches {', '.join(remote)} off loopback without TLS: passwords and "
                            "messages would cross the network in the clear; use rediss:// or amqps:// "
                            "(docs/network.md), or set BERTH_ALLOW_CLEARTEXT=1 on a network you trust")
    return problems


def check_settings(conf: Mapping[str, Any]) -> list[str]:
    """Every problem with this combination of settings (empty when it is safe)."""
    return (_backend_problems(conf) + cleartext_problems(conf) + _visibility_problems(conf)
            + _timing_problems(conf))


def ensure_safe(conf: Mapping[str, Any]) -> None:
    problems = check_settings(conf)
    if problems:
        raise UnsafeSettings(problems)
