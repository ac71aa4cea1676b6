"""Instance ids and every broker key or task id derived from them.

One fixed format keeps per-guest names unambiguous: an id is 1-40 characters
of lowercase letters, digits and hyphens, starting with a letter and not
ending with a hyphen. It never holds a dot, so a task id ``<id>.<step>`` or
a key ``celery-task-meta-<id>.*`` can never be read as belonging to an
instance whose id is a prefix of this one (``db-1`` vs ``db-10``).
"""

from __future__ import annotations

import hashlib
import re
import uuid

# Always used with fullmatch: "db-1\n" is not an id.
INSTANCE_ID_RE = re.compile(r"[a-z](?:[a-z0-9-]{0,38}[a-z0-9])?")
INSTANCE_ID_FORMAT = (
    "1-40 characters: lowercase letters, digits and '-', starting with a letter "
    "and not ending with '-' (e.g. db-1)"
)

# kombu's Redis transport: list per priority step, joined with this separator.
KOMBU_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
RESULT_KEY_PREFIX = "celery-task-meta-"


def guest_queue(instance_id: str) -> str:
    """The name of the one queue a guest consumes."""
    return f"guest.{instance_id}"


def kombu_lists(queue: str) -> list[str]:
    """Every Redis list that holds a queue's messages (one per priority step), read first to last."""
    return [queue if p == 0 else f"{queue}{KOMBU_SEP}{p}" for p in PRIORITY_STEPS]


def queue_lists(instance_id: str) -> list[str]:
    """Every Redis list that holds the guest queue's messages (one per priority step)."""
    return kombu_lists(guest_queue(instance_id))


def binding_keys(instance_id: str) -> list[str]:
    """The binding sets kombu keeps for the guest queue's direct exchange."""
    name = guest_queue(instance_id)
    return [f"_kombu.binding.{name}", f"_kombu.binding_permanent.{name}"]


def binding_member(instance_id: str) -> str:
    """The member that marks ``guest.ID`` as bound to its exchange (routing key, pattern, queue)."""
    name = guest_queue(instance_id)
    return KOMBU_SEP.join([name, "", name])


# The steps of the provisioning chain and of the delete chain, in order: each is the task
# ``taskmanager.<step>``. Routes, metrics, the reconciler and the chains are derived from these.
PROVISION_STEPS = ("create_queue", "ping_guest", "send_prepare", "verify")
DELETE_STEPS = ("shutdown_guest", "remove_instance")
STEPS = PROVISION_STEPS + DELETE_STEPS
# Steps of earlier chains (create_queue boots the guest now): still routed and run, for a chain
# that was in flight when the taskmanager was upgraded.
RETIRED_STEPS = ("boot_guest",)
ROUTED_STEPS = STEPS + RETIRED_STEPS


def step_task_name(step: str) -> str:
    """The Celery task of a chain step."""
    return f"taskmanager.{step}"


def task_id(instance_id: str, step: str) -> str:
    """A deterministic task id, prefixed with the instance id."""
    return f"{instance_id}.{step}"


def request_tag(request_id: str) -> str:
    """The short form of a provisioning request's id that its task ids carry (12 hex digits)."""
    return hashlib.sha1(request_id.encode(), usedforsecurity=False).hexdigest()[:12]


def step_task_id(instance_id: str, request_id: str, step: str) -> str:
    """``<id>.<step>.<request>``: the same on a redelivery, different for another request."""
    return task_id(instance_id, f"{step}.{request_tag(request_id)}")


GUEST_TASK_MARK = "guest"


def guest_task_prefix(instance_id: str) -> str:
    """Every task sent to a guest has an id starting with this, and no taskmanager step has.

    A guest's broker user may write the results of these ids only (berth/brokers/redis/acl.py).
    """
    return f"{instance_id}.{GUEST_TASK_MARK}."


def guest_task_id(instance_id: str, request_id: str, name: str) -> str:
    """``<id>.guest.<name>.<request>``: the id of a message to the guest."""
    return f"{guest_task_prefix(instance_id)}{name}.{request_tag(request_id)}"


def fresh_guest_task_id(instance_id: str, name: str) -> str:
    """``<id>.guest.<name>.<random>``: a message to the guest that no request names (a call, a ping)."""
    return f"{guest_task_prefix(instance_id)}{name}.{uuid.uuid4().hex[:12]}"


def ping_task_id(instance_id: str, request_id: str, attempt: int) -> str:
    return guest_task_id(instance_id, request_id, f"ping{attempt}")


def prepare_task_id(instance_id: str, request_id: str) -> str:
    return guest_task_id(instance_id, request_id, "prepare")


def instance_of(task_id_: str) -> str:
    """The instance a task id names: what comes before its first dot (the one parser of task ids;
    the step marks' Lua in berth/records.py builds them the same way to compare)."""
    return task_id_.partition(".")[0]


def result_key(task_id_: str) -> str:
    return f"{RESULT_KEY_PREFIX}{task_id_}"


def unacked_keys(instance_id: str) -> dict[str, str]:
    """Per-guest names for kombu's ack-emulation keys (transport options)."""
    return {
        "unacked_key": f"unacked.{instance_id}",
        "unacked_index_key": f"unacked_index.{instance_id}",
        "unacked_mutex_key": f"unacked_mutex.{instance_id}",
    }


def record_key(instance_id: str) -> str:
    return f"berth:instance:{instance_id}"


def secrets_key(instance_id: str) -> str:
    return f"berth:secrets:{instance_id}"


def deadletter_key(instance_id: str) -> str:
    """The guest's dead-letter list: messages it could not accept, kept for the operator."""
    return f"berth:deadletter:{instance_id}"


def heartbeat_key(instance_id: str) -> str:
    """The guest's heartbeat list: it appends its reports, the taskmanager takes them."""
    return f"berth:heartbeat:{instance_id}"


def finished_request_key(request_id: str) -> str:
    """Marks a provisioning or delete request as finished (its instance DELETED): a late
    redelivery of its message is then refused instead of bringing the instance back."""
    return f"berth:finished:{request_id}"


RECORD_INDEX_KEY = "berth:instances"
# Instances with a chain under way (BUILD, DELETING), scored by when a step of theirs last ran:
# what `tasks.reconcile` watches for a chain whose message was lost.
INFLIGHT_KEY = "berth:inflight"

# Metrics kept in the broker's Redis (berth/metrics.py): step duration histograms, status changes.
STEP_HISTOGRAM_KEY = "berth:metrics:steps"
TRANSITIONS_KEY = "berth:metrics:transitions"

# Taskmanager nodes (tasks/nodes.py): the set of nodes, each node's lease and its unacked keys.
NODES_KEY = "berth:nodes"


def lease_key(nodename: str) -> str:
    return f"berth:node:{nodename}"


def node_unacked_keys(nodename: str) -> dict[str, str]:
    return {"unacked_key": f"unacked.node.{nodename}",
            "unacked_index_key": f"unacked_index.node.{nodename}",
            "unacked_mutex_key": f"unacked_mutex.node.{nodename}"}


# The task the reconciler sends to resume a stalled chain (tasks/reconcile.py, workflows/tasks.py).
RESUME_TASK = "workflows.resume"
# Tasks whose id is the request's, not the instance's: their first argument names the instance.
REQUEST_TASKS = frozenset({"workflows.provision", "workflows.delete", RESUME_TASK})
# The control plane's own queue (celeryconfig's task_default_queue).
TASKMANAGER_QUEUE = "taskmanager"
# On RabbitMQ, the chains' steps have a queue of their own, consumed by every worker that consumes
# TASKMANAGER_QUEUE (celeryconfig.berth_steps_queue says why; on Redis it is TASKMANAGER_QUEUE).
STEPS_QUEUE = "taskmanager.steps"
# Guests whose heartbeats are watched, scored by when each was last heard from (tasks/heartbeats.py).
HEARTBEAT_INDEX_KEY = "berth:heartbeat-index"
# The fingerprint of the control plane's master key (berth/keys.py): another key is refused.
FINGERPRINT_KEY = "berth:master-key-fingerprint"
# kombu's Redis transport's shared unacked hash (consumers that keep none of their own).
SHARED_UNACKED_KEY = "unacked"
