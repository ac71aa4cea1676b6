"""The reconciler: a chain whose next message was lost is resumed from its record.

kombu's Redis transport takes a message with BRPOP and only then writes it to the consumer's
unacked hash; a broker killed between the two loses that message. The drills hit this. So the
taskmanager does not rely on messages alone: every step notes when it ran
(`berth.metrics.step_started`, before each run), and each node, every third of its lease, looks
for instances in BUILD or DELETING whose chain has not run a step for ``berth_stall_after_s``
while the taskmanager queues are empty (a busy queue may still hold the step), and whose next
message no taskmanager holds either (a retry waiting for its countdown, or a message prefetched
behind a long backlog, sits in the node's unacked hash). It then resumes the chain at the step
the record says comes next, with the chain's own task ids. Every step is safe to run twice, so
resuming a chain that was only slow costs a repeat, never a doubled effect.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

import redis

from berth.brokers import Broker
from berth.ids import INFLIGHT_KEY, NODES_KEY, RESUME_TASK
from berth.records import InstanceRecord, Records, Status, text
from tasks.celery_app import app
from tasks.runtime import taskmanager_queues

log = logging.getLogger("berth.reconcile")
# Claim an instance for resuming only if nobody touched it since we looked (one node wins).
_CLAIM = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1]) return 1
end
return 0
"""


def next_step(record: InstanceRecord) -> str | None:
    """The step of the instance's chain that has not finished yet, from its record."""
    if record.status is Status.NEW:
        return "create_queue"  # recorded by `workflows.submit`, its message lost
    if record.status is Status.BUILD:
        # Not booted yet: create_queue again (it boots; all it did before is safe to repeat).
        for step, done in (("create_queue", "booted_at"), ("ping_guest", "guest_ready_at"),
                           ("send_prepare", "prepare_sent_at")):
            if record.get(done) is None:
                return step
        return "verify"
    if record.status is Status.DELETING:
        return "remove_instance" if record.get("guest_shutdown") else "shutdown_guest"
    return None


def reconcile(broker: Broker, client: redis.Redis, stall_after_s: float, now: float | None = None) -> list[str]:
    """Resume every stalled chain; return the ids of the instances resumed.

    ``client``: the Redis of the instance records; ``broker``: where the steps' messages are.

    Resuming is a message, `workflows.resume` (RESUME_TASK): the chains are the workflows', so
    the taskmanager only names the instance and the step its record says comes next.
    """
    now = time.time() if now is None else now
    stalled = cast(list[tuple[Any, float]],
                   client.zrange(INFLIGHT_KEY, "-inf", now - stall_after_s, byscore=True, withscores=True))
    if not stalled or not all(broker.queue_empty(queue) for queue in taskmanager_queues()):
        return []
    records = Records(client)
    claim = client.register_script(_CLAIM)
    held = broker.held_instances(text(n) for n in client.smembers(NODES_KEY))
    resumed = []
    for raw_id, score in stalled:
        instance_id = text(raw_id)
        if instance_id in held:
            continue  # its next step waits in a taskmanager: slow, not lost
        record = records.get(instance_id)
        step = next_step(record) if record is not None else None
        if record is None or step is None:
            client.zrem(INFLIGHT_KEY, instance_id)  # final, or gone: nothing to resume
            continue
        if not claim(keys=[INFLIGHT_KEY], args=[instance_id, repr(score), now]):
            continue  # another node resumed it, or a step ran meanwhile
        app.send_task(RESUME_TASK, args=[instance_id, step])
        resumed.append(instance_id)
        log.warning("instance %s: %s chain stalled for %.0f s (%s): resumed at %s", instance_id,
                    "delete" if record.status is Status.DELETING else "provisioning", now - score,
                    record.status.value, step)
    return resumed
