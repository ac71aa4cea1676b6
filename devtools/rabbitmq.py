"""Private RabbitMQ nodes: Debian's ``rabbitmq-server``, unprivileged, on free loopback ports.

`RabbitNode` starts and stops one node from Python (the test suite, drills, benchmarks, `make run`
with ``BERTH_BROKER=rabbitmq``); `RabbitCluster` starts three and joins them (`make cluster`).
Each node has its own name, ports, data and log folders under its data dir, and a ``HOME`` that
holds the Erlang cookie (one cookie per cluster). It listens on 127.0.0.1 only (AMQP, the
management API and Erlang distribution alike), and never touches a RabbitMQ service that happens
to run on the machine: the machine's ``/etc/rabbitmq`` files are not read.

    python -m devtools.rabbitmq serve       # one node in the foreground (the Procfile's `rabbitmq`)
    python -m devtools.rabbitmq cluster     # three nodes, joined, until Ctrl-C (`make cluster`)
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

from berth.certs import Certificates
from berth.errors import BootError
from berth.paths import berth_home, broker_url_file, create_once, rabbitmq_api_file, replace_file
from berth.redis_server import free_port
from devtools.broker import guest_facing, private_dir

SERVER = Path(os.environ.get("BERTH_RABBITMQ_SBIN", "/usr/lib/rabbitmq/bin")) / "rabbitmq-server"
ADMIN_USER = "berth-admin"
# RabbitMQ's CLI tools take their own distribution port from this range: a node must not listen there.
_CLI_PORTS = range(35672, 35683)
# A message may stay unacknowledged this long before RabbitMQ closes the consumer's channel
# (3.10's default is 30 min): longer than any deadline a Berth message lives through.
CONSUMER_TIMEOUT_MS = 3 * 3600 * 1000
BOOT_TIMEOUT_S = 90.0
# How often the node emits, and its management database collects, the statistics of every object.
STATS_INTERVAL_S = 30
# (section, age kept, sample interval): the management database's smallest interval is the period
# of its collectors; each section needs a policy of its own (RabbitMQ's defaults: 5 s each).
RETENTION_POLICIES = (("global", "minute", STATS_INTERVAL_S), ("global", "hour", 60), ("global", "day", 1200),
                      ("basic", "minute", STATS_INTERVAL_S), ("basic", "hour", 60),
                      ("detailed", "minute", STATS_INTERVAL_S))


def server_missing() -> str | None:
    """Why no private node can start here, or None."""
    if not SERVER.exists() or not shutil.which("erl", path="/usr/lib/erlang/bin:/usr/bin"):
        return (f"RabbitMQ is not installed ({SERVER} missing): install Debian's rabbitmq-server "
                "(apt-get install rabbitmq-server; `make test` does it when it runs as root)")
    return None


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports outside the range RabbitMQ's CLI tools use."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port(exclude=_CLI_PORTS)
        if port not in ports:
            ports.append(port)
    return ports


class RabbitNode:
    """One private RabbitMQ node; its admin user's URL is `url`, its management API `api`."""

    def __init__(self, data_dir: Path, *, name: str | None = None, ports: tuple[int, int, int] | None = None,
                 home: Path | None = None, password: str | None = None, peers: tuple[str, ...] = (),
                 tls: Certificates | None = None, bind: tuple[str, ...] = ()) -> None:
        self.data_dir = Path(data_dir)
        # With certificates, AMQP is TLS only (amqps), on loopback and on ``bind`` (where guests reach it).
        self.tls, self.bind = tls, bind
        self.amqp_port, self.api_port, self.dist_port = ports or tuple(free_ports(3))
        self.name = name or f"berth-{self.amqp_port}@localhost"
        self.home = Path(home) if home else self.data_dir / "home"
        self._password = password
        # Other nodes' names: the node joins them at its first boot (classic peer discovery).
        self.peers = peers
        self.process: subprocess.Popen[bytes] | None = None

    # --- Addresses -------------------------------------------------------------------------------

    @property
    def password(self) -> str:
        if self._password is None:
            self._password = create_once(private_dir(self.data_dir) / "admin.secret",
                                         secrets.token_urlsafe(24) + "\n").strip()
        return self._password

    @property
    def url(self) -> str:
        """The admin user's AMQP URL (it carries the password), on the default vhost."""
        scheme = "amqps" if self.tls else "amqp"
        return f"{scheme}://{ADMIN_USER}:{quote(self.password, safe='')}@127.0.0.1:{self.amqp_port}//"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def env(self) -> dict[str, str]:
        d = self.data_dir
        return {**os.environ, "HOME": str(self.home), "RABBITMQ_NODENAME": self.name,
                "RABBITMQ_DIST_PORT": str(self.dist_port), "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
                "RABBITMQ_LOG_BASE": str(d / "log"), "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
                "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
                # Erlang distribution on loopback only, as AMQP and the management API.
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
                "RABBITMQ_CTL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
                # An epmd this node starts listens on loopback only too.
                "ERL_EPMD_ADDRESS": "127.0.0.1"}

    def _write_config(self) -> None:
        d = private_dir(self.data_dir)
        for sub in ("mnesia", "log"):
            (d / sub).mkdir(exist_ok=True)
        private_dir(self.home)
        replace_file(d / "rabbitmq.conf", "\n".join([
            *self._listeners(),
            f"management.tcp.port = {self.api_port}",
            "management.tcp.ip = 127.0.0.1",
            f"default_user = {ADMIN_USER}",
            f"default_pass = {self.password}",
            "default_user_tags.administrator = true",
            # The admin connects over loopback; guests never use this user.
            "loopback_users = none",
            f"consumer_timeout = {CONSUMER_TIMEOUT_MS}",
            # Statistics every 30 s, and the management database collects them every 30 s (both 5 s
            # by default). Every connection, channel, consumer and queue is emitted and collected at
            # each tick, busy or idle: with ten thousand guests connected, that was most of an idle
            # node's work (bench/idle.py). Berth reads none of these figures where their age matters:
            # a guest's connections come from the broker's connection tracking, exact at once; only
            # the reconciler reads an unacknowledged count, and a stale one costs a repeated step.
            f"collect_statistics_interval = {STATS_INTERVAL_S * 1000}",
            *(f"management.sample_retention_policies.{section}.{age} = {interval}"
              for section, age, interval in RETENTION_POLICIES),
            # Counts only: Berth reads no message rates, and computing them for every connection,
            # channel and queue is work an idle node need not do.
            "management.rates_mode = none",
            "log.console = true",
            "log.console.level = warning",
            "log.file.level = info",
            *(["cluster_formation.peer_discovery_backend = classic_config",
               *(f"cluster_formation.classic_config.nodes.{n} = {peer}" for n, peer in enumerate(self.peers, 1))]
              if self.peers else []),
            "",
        ]), mode=0o600)
        replace_file(d / "enabled_plugins", "[rabbitmq_management].\n")
        replace_file(d / "rabbitmq-env.conf", "# Berth's private node: nothing from /etc/rabbitmq.\n")
        replace_file(d / "advanced.config", "[].\n")

    def _listeners(self) -> list[str]:
        addresses = ["127.0.0.1", *self.bind]
        kind = "ssl" if self.tls else "tcp"
        lines = [f"listeners.{kind}.{n} = {address}:{self.amqp_port}" for n, address in enumerate(addresses, 1)]
        if self.tls:
            lines += ["listeners.tcp = none", f"ssl_options.cacertfile = {self.tls.ca}",
                      f"ssl_options.certfile = {self.tls.cert}", f"ssl_options.keyfile = {self.tls.key}",
                      # Guests authenticate with their passwords; the broker with its certificate.
                      "ssl_options.verify = verify_none", "ssl_options.fail_if_no_peer_cert = false",
                      "ssl_options.versions.1 = tlsv1.3", "ssl_options.versions.2 = tlsv1.2"]
        return lines

    # --- Life cycle ------------------------------------------------------------------------------

    def command(self) -> list[str]:
        return [str(SERVER)]

    def start(self, *, log_to: Path | None = None, timeout_s: float = BOOT_TIMEOUT_S) -> RabbitNode:
        self.launch(log_to=log_to)
        try:
            self.wait_ready(timeout_s)
        except BootError:
            self.kill()
            raise
        return self

    def launch(self, *, log_to: Path | None = None) -> None:
        """Start the node's process without waiting for it (`wait_ready`)."""
        problem = server_missing()
        if problem:
            raise BootError(problem)
        self._write_config()
        out = open(log_to or self.data_dir / "server.out", "ab")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen(self.command(), env=self.env(), stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        out.close()

    def wait_ready(self, timeout_s: float = BOOT_TIMEOUT_S) -> None:
        """Until the node serves AMQP and its management API answers for the admin."""
        deadline = time.monotonic() + timeout_s
        last: object = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise BootError(f"RabbitMQ node {self.name} exited with {self.process.returncode}; "
                                f"see {self.data_dir / 'server.out'} and {self.data_dir / 'log'}")
            try:
                self.request("GET", "/api/overview")
                with socket.create_connection(("127.0.0.1", self.amqp_port), timeout=1):
                    return
            except (OSError, urllib.error.URLError) as exc:
                last = exc
            time.sleep(0.2)
        raise BootError(f"RabbitMQ node {self.name} did not come up within {timeout_s:.0f} s: {last}")

    def request(self, method: str, path: str, body: Any = None, timeout_s: float = 5.0) -> Any:
        """One call to the node's management API as the admin; the decoded answer."""
        token = base64.b64encode(f"{ADMIN_USER}:{self.password}".encode()).decode()
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.api + path, data=data, method=method,
                                     headers={"Authorization": f"Basic {token}", "content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout_s) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def pid(self) -> int | None:
        """The node's Erlang VM (the server script execs into it)."""
        return self.process.pid if self.process and self.process.poll() is None else None

    def kill(self) -> None:
        """SIGKILL the whole node (the crash a drill needs); its data stays for the next start."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> RabbitNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RabbitCluster:
    """Three (or ``size``) nodes with one cookie, joined into one cluster."""

    def __init__(self, root: Path, size: int = 3) -> None:
        self.root = Path(root)
        home = private_dir(self.root / "home")
        password = create_once(private_dir(self.root) / "admin.secret", secrets.token_urlsafe(24) + "\n").strip()
        ports = [tuple(free_ports(3)) for _ in range(size)]
        names = tuple(f"berth-{p[0]}@localhost" for p in ports)
        self.nodes = [RabbitNode(self.root / f"node{n}", name=names[n - 1], ports=ports[n - 1],  # type: ignore[arg-type]
                                 home=home, password=password, peers=names) for n in range(1, size + 1)]

    def start(self, *, logs: Path | None = None, timeout_s: float = BOOT_TIMEOUT_S) -> RabbitCluster:
        """Boot the nodes side by side; they find each other (classic peer discovery, one cookie)
        and form one cluster. A node started again later rejoins by itself."""
        for node in self.nodes:
            node.launch(log_to=logs / f"{node.name}.out" if logs else None)
        try:
            for node in self.nodes:
                node.wait_ready(timeout_s)
            deadline = time.monotonic() + timeout_s
            while len(self.running_nodes()) < len(self.nodes):
                if time.monotonic() > deadline:
                    raise BootError(f"the cluster did not form within {timeout_s:.0f} s: running "
                                    f"{self.running_nodes()}")
                time.sleep(0.5)
        except BootError:
            self.kill()
            raise
        return self

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """One broker URL naming every node (kombu fails over in order: `failover_strategy`)."""
        return ";".join(self.urls)

    def running_nodes(self) -> list[str]:
        for node in self.nodes:
            if node.pid() is not None:
                try:
                    return [str(n["name"]) for n in node.request("GET", "/api/nodes") if n.get("running")]
                except (OSError, urllib.error.URLError):
                    continue
        return []

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()

    def __enter__(self) -> RabbitCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def rabbitmq_dir() -> Path:
    return berth_home() / "rabbitmq"


def serve() -> None:
    """One node in the foreground until SIGTERM/SIGINT (the Procfile's `rabbitmq`)."""
    ports = tuple(int(os.environ[k]) for k in ("BERTH_RABBITMQ_PORT", "BERTH_RABBITMQ_API_PORT",
                                              "BERTH_RABBITMQ_DIST_PORT") if os.environ.get(k))
    tls, bind = guest_facing()
    node = RabbitNode(rabbitmq_dir(), ports=(ports[0], ports[1], ports[2]) if len(ports) == 3 else None,
                      tls=tls, bind=bind)
    node.start(log_to=rabbitmq_dir() / "server.out")
    # A second shell finds the node without any setting (celeryconfig reads these files).
    replace_file(broker_url_file(), node.url + "\n", mode=0o600)
    replace_file(rabbitmq_api_file(), node.api + "\n")
    where = ", ".join(f"{address}:{node.amqp_port}" for address in ("127.0.0.1", *bind))
    print(f"rabbitmq: node {node.name} ready on {where}{' (TLS)' if tls else ''} (management API {node.api})",
          flush=True)
    _wait_for_signal(node.stop, [node])


def cluster() -> None:
    """Three joined nodes until Ctrl-C (`make cluster`)."""
    group = RabbitCluster(berth_home() / "cluster")
    print("cluster: starting three RabbitMQ nodes ...", flush=True)
    group.start()
    print(f"cluster: running nodes {', '.join(group.running_nodes())}")
    print(f"cluster: CELERY_BROKER_URL='{group.url}'")
    print(f"cluster: BERTH_RABBITMQ_API={','.join(n.api for n in group.nodes)}  BERTH_QUEUE_TYPE=quorum")
    print("cluster: Ctrl-C stops the three nodes (their data stays under var/cluster)", flush=True)
    _wait_for_signal(group.stop, group.nodes)


def _wait_for_signal(stop: Any, nodes: list[RabbitNode]) -> None:
    stopping = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stopping and all(n.pid() is not None for n in nodes):
        time.sleep(0.5)
    stop()


if __name__ == "__main__":
    commands = {"serve": serve, "cluster": cluster}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit("usage: python -m devtools.rabbitmq serve|cluster")
    commands[sys.argv[1]]()
