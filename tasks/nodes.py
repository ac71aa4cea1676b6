"""Taskmanager nodes own their in-flight messages, so a crashed node's work resumes at once.

Each node (``celery -A tasks worker -n NAME``) keeps what it has taken and not yet acknowledged
in its own unacked hash, ``unacked.node.NAME``, and holds a lease in Redis,
``berth:node:NAME`` = ``host|pid``, renewed every third of ``berth_node_lease_s``:

- a node restarted under the same name gets its previous run's messages back when it
  connects (the broker's consumer step: `berth.brokers.redis.unacked.RestoreOwnUnacked`); on
  the same host it takes over a lease whose process is gone at once, otherwise it waits for
  the lease to lapse;
- a node that never comes back: any other node finds its lease lapsed and puts its messages
  back on their queues (a sweep every third of the lease);
- two live processes never share a name: the second refuses to start.

Every step is safe to run twice, so a message restored while a partitioned node still ran it
costs a repeat, never a lost or doubled effect.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

import redis
from celery import Celery, bootsteps
from celery.worker.control import inspect_command

from berth.brokers import CONNECTION_ERRORS
from berth.config import store_url
from berth.errors import KeyProblem, NodeNameTaken
from berth.ids import NODES_KEY, lease_key, node_unacked_keys
from berth.keys import check_master_key
from berth.records import Records
from berth.steps import berth_thread_names
from berth.tls import redis_from_url
from tasks.drivers import pid_alive
from tasks.reconcile import reconcile
from tasks.runtime import broker

log = logging.getLogger("berth.nodes")
# The store or the broker away for a moment: the lease loop waits a stall period, then goes on.
TRANSIENT: tuple[type[BaseException], ...] = (redis.RedisError, *CONNECTION_ERRORS)
# Replace the lease only if it still holds the value we expect.
_SWAP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1
end
return 0
"""


class Lease:
    """This node's lease, and the sweep that rescues lapsed nodes' messages."""

    def __init__(self, app: Celery, client: redis.Redis, nodename: str, ttl_s: float) -> None:
        self.app, self.client, self.nodename, self.ttl_s = app, client, nodename, ttl_s
        self.key = lease_key(nodename)
        self.value = f"{socket.gethostname()}|{os.getpid()}"
        self._swap = client.register_script(_SWAP)
        self._stop = threading.Event()
        # When this node last saw the broker fail, and since when it has seen each node's lease missing.
        self.last_broker_error = time.monotonic()
        self._missing_since: dict[str, float] = {}

    @property
    def ttl_ms(self) -> int:
        return int(self.ttl_s * 1000)

    def acquire(self, wait_s: float) -> None:
        """Take the lease; a dead holder on this host is replaced at once, others lapse first."""
        deadline = time.monotonic() + wait_s
        while True:
            if self.client.set(self.key, self.value, nx=True, px=self.ttl_ms):
                break
            holder = self.client.get(self.key)  # a str: the client decodes responses
            if holder == self.value and self._swap(keys=[self.key], args=[holder, self.value, self.ttl_ms]):
                # An earlier worker of this very process (an in-process test worker, say) that has stopped.
                break
            if holder is not None and self._holder_is_dead_here(str(holder)):
                if self._swap(keys=[self.key], args=[holder, self.value, self.ttl_ms]):
                    log.warning("node %s: took over the lease of its dead previous run (%s)", self.nodename, holder)
                    break
                continue
            if time.monotonic() >= deadline:
                raise NodeNameTaken(f"another taskmanager named {self.nodename} holds its lease ({holder!s}): "
                                    "give this one another --hostname")
            time.sleep(min(0.5, self.ttl_s / 10))
        self.client.sadd(NODES_KEY, self.nodename)

    def _holder_is_dead_here(self, holder: str) -> bool:
        host, _, pid = holder.partition("|")
        return host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid() \
            and not pid_alive(int(pid))

    def renew(self) -> bool:
        return bool(self._swap(keys=[self.key], args=[self.value, self.value, self.ttl_ms]))

    def sweep(self) -> int:
        """Put back the messages of nodes whose lease lapsed; return how many."""
        restored = 0
        now = time.monotonic()
        for name in sorted(str(n) for n in self.client.smembers(NODES_KEY)):
            if name == self.nodename or self.client.exists(lease_key(name)):
                self._missing_since.pop(name, None)
                continue
            # A lease can vanish with a broker restart while its node lives: give it a whole
            # lease period, as seen from here, to renew before taking its messages.
            if now - self._missing_since.setdefault(name, now) < self.ttl_s:
                continue
            # Hold the lapsed node's lease while rescuing it: neither it nor another sweeper interferes.
            claim = f"sweep|{self.value}"
            if not self.client.set(lease_key(name), claim, nx=True, px=self.ttl_ms):
                continue
            try:
                count = broker().restore_unacked(self.app, node_unacked_keys(name))
                self.client.srem(NODES_KEY, name)
                self._missing_since.pop(name, None)
                restored += count
                log.warning("node %s: lease lapsed; restored %d message(s) it had taken", name, count)
            finally:
                self._swap(keys=[lease_key(name)], args=[claim, claim, 1])
        return restored

    def keep(self) -> None:
        """Renew, sweep and reconcile every third of the lease until stopped (a daemon thread).

        After a broker error the node waits a whole stall period before it reconciles: the
        consumers are still reconnecting and putting back what they held, and chains that only
        look stalled would be resumed twice.
        """
        stall_after_s = float(self.app.conf.berth_stall_after_s)
        # Guests' broker users, at start and whenever a server restarted or failed: a broker may
        # keep them in no file (berth/brokers).
        check_users = True
        while not self._stop.wait(self.ttl_s / 3):
            try:
                # The lease first: it lives in the store, which may be up while the broker is not.
                if not self.renew() and not self.client.set(self.key, self.value, nx=True, px=self.ttl_ms):
                    log.error("node %s: lost its lease to %s", self.nodename, self.client.get(self.key))
                self.client.sadd(NODES_KEY, self.nodename)
                broker().restore_guests(Records(self.client).live_guests, everywhere=check_users)
                check_users = False
                self.sweep()
                if time.monotonic() - self.last_broker_error >= stall_after_s:
                    reconcile(broker(), self.client, stall_after_s)
            except TRANSIENT as exc:
                self.last_broker_error = time.monotonic()
                check_users = True
                log.warning("node %s: lease not renewed (broker: %s); retrying", self.nodename, exc)
            except Exception:  # noqa: BLE001 - the thread must outlive any one failure
                self.last_broker_error = time.monotonic()
                check_users = True
                log.exception("node %s: lease upkeep failed; retrying", self.nodename)

    def start(self) -> None:
        threading.Thread(target=self.keep, name="berth-node-lease", daemon=True).start()

    def stop(self) -> None:
        """Stop renewing. The lease lapses by itself once the process is gone, and never before
        the consumer has put back what it held; a restart on this host takes it over at once."""
        self._stop.set()


class OwnUnacked(bootsteps.StartStopStep):
    """Worker step: per-node unacked keys and the node's lease, before the consumer connects."""

    def __init__(self, worker: Any, **options: Any) -> None:
        super().__init__(worker, **options)
        self.lease: Lease | None = None
        app = worker.app
        nodename = worker.hostname
        ttl_s = float(app.conf.berth_node_lease_s)
        client = redis_from_url(store_url(app.conf.broker_url, app.conf.result_backend), decode_responses=True,
                                      socket_connect_timeout=2.0)
        lease = Lease(app, client, nodename, ttl_s)
        try:
            check_master_key(client)
            lease.acquire(wait_s=ttl_s + 1.0)
        except (NodeNameTaken, KeyProblem, redis.RedisError) as exc:
            raise SystemExit(f"taskmanager {nodename} refused to start: {exc}") from exc
        keys = node_unacked_keys(nodename)
        app.conf.broker_transport_options = {**app.conf.broker_transport_options, **keys}
        broker().use_own_unacked(keys)
        self.lease = lease

    def create(self, worker: Any) -> Lease | None:
        return self.lease


@inspect_command()
def berth_threads(state: Any) -> dict[str, list[str]]:
    """``celery -A tasks inspect berth_threads``: which Berth background threads run in each node."""
    return {"threads": berth_thread_names()}
