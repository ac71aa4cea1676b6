"""The broker a test session (or a private stack) runs on: the embedded Redis, or a private
RabbitMQ node with an embedded Redis beside it as the store (records, answers).

``BERTH_TEST_BROKER=rabbitmq`` picks RabbitMQ (`make test` runs the broker-facing suite, the
tests marked ``broker``, a second time that way); otherwise Redis. A RabbitMQ node here is always
a private one on free ports: never a service that happens to run on the machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import redis

from berth.certs import ensure_certificates
from berth.tls import redis_ssl
from devtools.broker import EmbeddedRedis
from devtools.rabbitmq import RabbitCluster, RabbitNode


def kind() -> str:
    chosen = os.environ.get("BERTH_TEST_BROKER", "redis")
    if chosen not in ("redis", "rabbitmq"):
        raise SystemExit(f"BERTH_TEST_BROKER={chosen!r}: expected redis or rabbitmq")
    return chosen


def on_rabbitmq() -> bool:
    return kind() == "rabbitmq"


class TestBroker:
    """A broker and its store, started under ``root``. `kill` and `start` act on the broker.

    ``which``: "redis", "rabbitmq" (one node) or "cluster" (three joined nodes, quorum queues)."""

    def __init__(self, root: Path, which: str | None = None, *, queue_type: str = "classic",
                 tls: bool = False, bind: tuple[str, ...] = ()) -> None:
        """``tls``: broker and store speak TLS only, with certificates of their own CA; ``bind``: the
        addresses besides loopback they listen on (a bridge that guests' namespaces reach)."""
        self.kind = which or kind()
        self.queue_type = "quorum" if self.kind == "cluster" else queue_type
        self.certs = ensure_certificates(root / "tls", list(bind)) if tls else None
        self.store = EmbeddedRedis(root / "redis", tls=self.certs, bind=bind)
        self.cluster = RabbitCluster(root / "cluster") if self.kind == "cluster" else None
        self.node = RabbitNode(root / "rabbitmq", tls=self.certs, bind=bind) if self.kind == "rabbitmq" else None

    def start(self) -> TestBroker:
        """Start whatever is not running (after `kill`: the broker, from its data)."""
        if self.store.process is None or self.store.process.poll() is not None:
            self.store.start()
        if self.node is not None and self.node.pid() is None:
            self.node.start()
        if self.cluster is not None:
            if all(n.pid() is None for n in self.cluster.nodes):
                self.cluster.start()
            for node in self.cluster.nodes:
                if node.pid() is None:
                    node.start()  # a killed node rejoins from its data
        return self

    def kill(self) -> None:
        """SIGKILL the broker (the RabbitMQ node, or the Redis that is both broker and store)."""
        if self.node is not None:
            self.node.kill()
        elif self.cluster is None:
            self.store.kill()
        else:
            raise ValueError("kill one of cluster.nodes")

    def stop(self) -> None:
        """A test's nodes hold nothing worth a clean shutdown: SIGKILL is quicker by seconds."""
        if self.node is not None:
            self.node.kill()
        if self.cluster is not None:
            self.cluster.kill()
        self.store.stop()

    @property
    def url(self) -> str:
        if self.cluster is not None:
            return self.cluster.url
        return self.node.url if self.node is not None else self.store.url

    @property
    def store_url(self) -> str:
        return self.store.url

    def env(self) -> dict[str, str]:
        env = {"CELERY_BROKER_URL": self.url, "CELERY_RESULT_BACKEND": self.store.url}
        if self.certs is not None:
            env["BERTH_BROKER_CA"] = str(self.certs.ca)
        if self.node is not None:
            env.update(BERTH_RABBITMQ_API=self.node.api, BERTH_QUEUE_TYPE=self.queue_type)
        if self.cluster is not None:
            env.update(BERTH_RABBITMQ_API=",".join(n.api for n in self.cluster.nodes), BERTH_QUEUE_TYPE="quorum")
        return env

    def client(self) -> redis.Redis:
        """A decoded client on the store (instance records)."""
        return redis.Redis.from_url(self.store.url, decode_responses=True,
                                    **redis_ssl(self.store.url, self.certs.ca_pem() if self.certs else None))
