"""Every Celery and Berth setting in one place, each with its unit and why.

Each value can be overridden by the environment variable named beside it.
Berth's own settings carry the ``berth_`` prefix and their unit in their name.
`berth.config.check_settings` refuses combinations that could lose or repeat work: the
taskmanager will not start and the command line will not send with them.
"""

from __future__ import annotations

import os

from amqp.exceptions import MessageNacked

from berth.guestapi import OPERATIONS
from berth.ids import ROUTED_STEPS, STEPS_QUEUE, step_task_name
from berth.netns import DEFAULT_BRIDGE, DEFAULT_SUBNET, DEFAULT_UID_BASE
from berth.paths import broker_url_file, rabbitmq_api_file, result_url_file
from berth.tls import amqp_ssl, load_ca, redis_ssl, scheme


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={raw!r} is not a number of seconds") from exc


def _default_broker_url() -> str:
    # A broker started by `make run` writes its URL here, so a second shell needs no setting.
    try:
        return broker_url_file().read_text().strip()
    except OSError:
        return "redis://127.0.0.1:6379/0"


def _default_result_backend(broker: str) -> str:
    # Beside RabbitMQ, records and answers live in a Redis: the one `make run` started, if any.
    if broker.split(":", 1)[0] in ("redis", "rediss"):
        return broker
    try:
        return result_url_file().read_text().strip()
    except OSError:
        return "redis://127.0.0.1:6379/0"


# --- Broker and result backend -------------------------------------------------------------
# Redis (redis://, rediss://) or RabbitMQ (amqp://USER:PASSWORD@HOST:PORT/VHOST; several URLs
# joined by ";" for a cluster). Beside RabbitMQ the result backend must be a Redis: instance
# records, guests' answers, heartbeats and dead letters live there (docs/rabbitmq.md).
broker_url = os.environ.get("CELERY_BROKER_URL") or _default_broker_url()
result_backend = os.environ.get("CELERY_RESULT_BACKEND") or _default_result_backend(broker_url)
_ON_RABBITMQ = broker_url.split(":", 1)[0] in ("amqp", "amqps", "pyamqp")
# RabbitMQ only: guest queues (and the taskmanager's own) are "classic" or "quorum" (replicated
# by Raft across a cluster's nodes: what survives the loss of a node). Chosen once per vhost:
# RabbitMQ refuses to re-declare a queue with another type.
berth_queue_type = os.environ.get("BERTH_QUEUE_TYPE", "classic")
# RabbitMQ only: its management HTTP API (users, permissions, connections); comma-separated for
# a cluster. Unset: http://HOST:15672 for each host of broker_url.
def _default_rabbitmq_api() -> str | None:
    try:
        return rabbitmq_api_file().read_text().strip() or None
    except OSError:
        return None


berth_rabbitmq_api = os.environ.get("BERTH_RABBITMQ_API") or _default_rabbitmq_api()
# --- TLS (docs/network.md) -----------------------------------------------------------------------
# rediss:// and amqps:// URLs verify the broker against this CA (its PEM text, or a file holding it;
# `guest-env` hands a guest the text), else against the system's CAs. Never unverified.
berth_broker_ca = load_ca(os.environ.get("BERTH_BROKER_CA"))
if scheme(broker_url) in ("rediss", "amqps"):
    broker_use_ssl = redis_ssl(broker_url, berth_broker_ca) if scheme(broker_url) == "rediss" \
        else amqp_ssl(berth_broker_ca)
if scheme(result_backend) == "rediss":
    redis_backend_use_ssl = redis_ssl(result_backend, berth_broker_ca)
# A connection off loopback without TLS is refused (berth.config) unless this is set: a network you trust.
berth_allow_cleartext = os.environ.get("BERTH_ALLOW_CLEARTEXT", "") not in ("", "0", "false", "no")
broker_connection_retry_on_startup = True
# A provisioning request against a broker that is down fails in seconds, not minutes.
broker_connection_timeout = _env_float("BERTH_BROKER_CONNECT_TIMEOUT_S", 4.0)
broker_transport_options = {
    # Seconds a message may stay unacknowledged before Redis hands it to another consumer.
    # Must exceed the longest task (a prepare, bounded by berth_prepare_deadline_max_s) plus margin,
    # or a long prepare runs twice at once.
    "visibility_timeout": _env_float("BERTH_VISIBILITY_TIMEOUT_S", 3600.0),
    "socket_connect_timeout": 2.0,
} if not _ON_RABBITMQ else {
    # Every publish waits for the broker's confirm (a nack raises), at most this many seconds
    # (berth.config refuses RabbitMQ without them; tasks/masking.py passes the timeout and
    # `mandatory`, so an unroutable message raises too).
    "confirm_publish": True,
    # 30 s: a quorum queue whose leader's node died confirms again once a new leader is
    # elected, which took over 10 s on a loaded 2-core machine.
    "confirm_timeout": _env_float("BERTH_CONFIRM_TIMEOUT_S", 30.0),
    # A cluster's URLs are tried in order when a node goes away.
    "failover_strategy": "round-robin",
}
if _ON_RABBITMQ:
    # The taskmanager's queues are declared with the guests' queue type: on a cluster they must
    # survive the loss of a node too.
    task_default_queue_type = berth_queue_type
    # ... and so is any queue Celery creates on first use (guestapi).
    task_create_missing_queue_type = berth_queue_type
# A publish against a broker that is down gives up after ~1.5 s and raises, instead of hanging.
# A publish RabbitMQ refused (a nack: the queue's leader was lost, in a cluster) is tried again
# the same way: the next one waits for the new leader's confirm. Celery gives up a refused
# callback publish (a chain's next step) at once otherwise, and the finished step would fail.
task_publish_retry_policy = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.3, "interval_max": 0.6,
                             "retry_errors": (MessageNacked,)}
# Seconds a task result stays in Redis (delete removes an instance's results earlier).
result_expires = int(_env_float("BERTH_RESULT_EXPIRES_S", 86400.0))
# The crash drills' failpoints (devtools/failpoints.py), loaded by a worker only when a drill names some.
imports = ("devtools.failpoints",) if os.environ.get("BERTH_FAILPOINTS") else ()
# A result stored while the broker restarts is retried, not lost (a guest's answer to prepare).
result_backend_always_retry = True
result_backend_max_retries = 120
result_backend_max_sleep_between_retries_ms = 1000
# Results never carry task arguments (they would hold prepare's passwords).
result_extended = False

# --- Serialisation ---------------------------------------------------------------------------
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]

# --- Delivery --------------------------------------------------------------------------------
task_default_queue = "taskmanager"
# The guest API's tasks (workflows.list_users, ...) wait for a guest's answer: they run on their
# own queue and worker (Procfile: guestapi), never in the slots the provisioning steps need.
GUEST_API_QUEUE = "guestapi"
# A request, a delete, or any other task sent during a wave of provisionings is taken before the
# wave's backlog of chain steps, not behind it. A step called by hand (`celery call
# taskmanager.<step>`) is routed like the chains' own.
# - Redis: the steps go to the taskmanager queue at a lower priority than anything else sent
#   there (0 is the highest; kombu reads the priority lists in order).
# - RabbitMQ: quorum queues have no priorities, and a classic queue has them only with an
#   x-max-priority fixed when it is first declared. The steps go to a queue of their own,
#   taskmanager.steps, which every worker that consumes taskmanager consumes too
#   (tasks/signals.py); RabbitMQ delivers from the two in turn.
STEP_PRIORITY = 6
berth_steps_queue = STEPS_QUEUE if _ON_RABBITMQ else task_default_queue
_STEP_PRIORITY = {} if _ON_RABBITMQ else {"priority": STEP_PRIORITY}
task_routes = {
    **{f"workflows.{operation}": {"queue": GUEST_API_QUEUE} for operation in OPERATIONS},
    **{step_task_name(step): {"queue": berth_steps_queue, **_STEP_PRIORITY} for step in ROUTED_STEPS},
}
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
# No STARTED state in the result backend: it cost every task a read and a write before its body
# ran, and nothing reads it (Flower learns that a task started from the task-started event).
task_track_started = False
worker_send_task_events = True
task_send_sent_event = True
worker_hijack_root_logger = True

# --- Berth: provisioning deadlines and backoff (seconds) -------------------------------------
# Trove waited up to 1,800 s for a guest; Berth gives up on an unreachable guest after this.
berth_ping_deadline_s = _env_float("BERTH_PING_DEADLINE_S", 60.0)
# Time a guest has to finish prepare once it has been sent; also the prepare message's expiry.
berth_prepare_deadline_s = _env_float("BERTH_PREPARE_DEADLINE_S", 300.0)
# Upper bounds accepted for per-instance deadlines (kept far below the visibility timeout).
berth_ping_deadline_max_s = _env_float("BERTH_PING_DEADLINE_MAX_S", 1800.0)
berth_prepare_deadline_max_s = _env_float("BERTH_PREPARE_DEADLINE_MAX_S", 1800.0)
berth_boot_delay_max_s = _env_float("BERTH_BOOT_DELAY_MAX_S", 600.0)
# Ping retries: base * 2**attempt, capped. The cap bounds how late a late guest is noticed.
berth_ping_backoff_base_s = _env_float("BERTH_PING_BACKOFF_BASE_S", 0.1)
berth_ping_backoff_cap_s = _env_float("BERTH_PING_BACKOFF_CAP_S", 1.0)
# Only the first ping waits for its pong inside the task, and only this long: a live guest
# answers in milliseconds, and a late one must not hold a taskmanager slot.
berth_ping_reply_wait_s = _env_float("BERTH_PING_REPLY_WAIT_S", 0.05)
# Checks for prepare's result: the same shape as the ping's.
berth_verify_backoff_base_s = _env_float("BERTH_VERIFY_BACKOFF_BASE_S", 0.05)
berth_verify_backoff_cap_s = _env_float("BERTH_VERIFY_BACKOFF_CAP_S", 1.0)
berth_verify_reply_wait_s = _env_float("BERTH_VERIFY_REPLY_WAIT_S", 0.2)
# --- Berth: delete (seconds) ------------------------------------------------------------------
# Delete pings the guest this long before it goes on without it (a dead guest holds nothing up).
berth_delete_ping_deadline_s = _env_float("BERTH_DELETE_PING_DEADLINE_S", 5.0)
# How long the guest has to shut its datastore down once asked.
berth_shutdown_deadline_s = _env_float("BERTH_SHUTDOWN_DEADLINE_S", 30.0)
# How long delete waits for a provisioning chain it interrupted to stop.
berth_chain_stop_wait_s = _env_float("BERTH_CHAIN_STOP_WAIT_S", 30.0)
# A deleted instance's record stays this long for audit, then expires (7 days).
berth_deleted_record_ttl_s = _env_float("BERTH_DELETED_RECORD_TTL_S", 7 * 86400.0)

# --- Berth: the netns boot driver (docs/network.md) ---------------------------------------------
# Guests hang off this bridge, one address of this subnet each; the broker listens on its first
# address (the gateway) beside loopback. Guest i runs as uid berth_guest_uid_base + i.
berth_netns_bridge = os.environ.get("BERTH_NETNS_BRIDGE") or DEFAULT_BRIDGE
berth_netns_subnet = os.environ.get("BERTH_NETNS_SUBNET") or DEFAULT_SUBNET
berth_guest_uid_base = int(_env_float("BERTH_GUEST_UID_BASE", DEFAULT_UID_BASE))

# --- Berth: taskmanager nodes ------------------------------------------------------------------
# A taskmanager node renews its lease in Redis every third of this; when a node has been gone
# this long, another node puts back the messages it had taken (see tasks/nodes.py).
berth_node_lease_s = _env_float("BERTH_NODE_LEASE_S", 15.0)
# A chain that has run no step for this long while the taskmanager queue is empty lost its
# message (a broker crash between BRPOP and the unacked write): it is resumed from its record.
berth_stall_after_s = _env_float("BERTH_STALL_AFTER_S", 30.0)
# How long a stopped guest gets to finish its current task before it is killed.
berth_guest_stop_timeout_s = _env_float("BERTH_GUEST_STOP_TIMEOUT_S", 10.0)
# How long `python -m workflows provision --wait` waits for a taskmanager to pick the request up.
berth_pickup_timeout_s = _env_float("BERTH_PICKUP_TIMEOUT_S", 15.0)

# --- Berth: heartbeats and the guest API (seconds) ----------------------------------------------
# An ACTIVE guest reports its datastore's status this often (guest/heartbeat.py). Each report is a
# write the broker makes durable: at 10 s, 10,000 idle guests' reports were most of their cost to
# a Redis (BENCHMARKS.md, `make bench-idle`); Trove's guests report every 30 s.
berth_heartbeat_interval_s = _env_float("BERTH_HEARTBEAT_INTERVAL_S", 20.0)
# Redis only: how long an idle guest's BRPOP waits before the guest asks again (kombu's
# polling_interval; guest/celery_app.py). A message ends the wait at once, so only the idle cost
# depends on it: one BRPOP per guest per interval (at kombu's own 1 s, 10,000 idle guests send
# 10,000 a second; BENCHMARKS.md, `make bench-idle`). Kept below kombu's health_check_interval
# (25 s), or redis-py sends a PING before each BRPOP; a guest notices a silently dead connection
# within this interval plus 25 s. A stopping guest's wait is ended by the control plane
# (Broker.release_waits), so it does not make a stop or a delete slower.
berth_guest_polling_interval_s = _env_float("BERTH_GUEST_POLLING_INTERVAL_S", 20.0)
# No heartbeat for this long: the instance is UNKNOWN until one comes (Trove waits 90 s).
berth_heartbeat_expiry_s = _env_float("BERTH_HEARTBEAT_EXPIRY_S", 65.0)
# How often each taskmanager takes the heartbeats and looks for silent guests.
berth_heartbeat_check_s = _env_float("BERTH_HEARTBEAT_CHECK_S", 1.0)
# A guest API call first pings the guest when its last heartbeat is older than this.
berth_heartbeat_stale_s = _env_float("BERTH_HEARTBEAT_STALE_S", 25.0)
# That ping's timeout: a guest that does not answer fails the call at once.
berth_guest_ping_timeout_s = _env_float("BERTH_GUEST_PING_TIMEOUT_S", 3.0)
# How long a guest API call waits for the guest's answer (a cast does not wait; its message
# expires after berth_guest_cast_ttl_s unless a guest ran it).
berth_guest_call_timeout_s = _env_float("BERTH_GUEST_CALL_TIMEOUT_S", 10.0)
berth_guest_call_timeout_max_s = _env_float("BERTH_GUEST_CALL_TIMEOUT_MAX_S", 120.0)
berth_guest_cast_ttl_s = _env_float("BERTH_GUEST_CAST_TTL_S", 300.0)

# --- Berth: what Flower shows of guest messages (seconds; tasks/outcomes.py) --------------------
# A guest message unanswered this long past its expiry shows EXPIRED (a guest that took it just
# before its expiry may still be answering).
berth_outcome_grace_s = _env_float("BERTH_OUTCOME_GRACE_S", 5.0)
# How often each taskmanager node looks for guest messages past their expiry.
berth_outcome_sweep_s = _env_float("BERTH_OUTCOME_SWEEP_S", 1.0)
