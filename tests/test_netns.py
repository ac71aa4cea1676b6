"""Guests on a network of their own (the netns boot driver) over TLS, on Redis and on RabbitMQ.

One stack per module: a TLS-only broker on loopback and on the module's own bridge, a taskmanager,
guests in namespaces as OS users of their own. Needs root (tests/netns.py); CI runs it as root.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from berth.errors import BootError
from berth.netns import Link
from tests.helpers import unique_id, wait_until
from tests.netns import NetnsStack, require_root

pytestmark = [pytest.mark.broker, pytest.mark.timeout(300)]
PASSWORD = "wire-secret-5n7Vq2"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsStack]:
    require_root()
    stack = NetnsStack(tmp_path_factory.mktemp("netns"))
    try:
        stack.start_taskmanager()
        yield stack
    finally:
        stack.close()


def guest_pid(stack: NetnsStack, instance_id: str) -> int:
    pid = stack.driver().pid(instance_id)
    assert pid is not None, f"the guest of {instance_id} does not run"
    return pid


def link_of(stack: NetnsStack, instance_id: str) -> Link:
    link = stack.driver().link(instance_id)
    assert link is not None, f"{instance_id} has no link"
    return link


def status_field(pid: int, field: str) -> str:
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(field))
    return line.split(":", 1)[1].split()[0]


def as_guest(stack: NetnsStack, instance_id: str, code: str) -> dict[str, str]:
    """Run ``code`` (Python, printing a JSON object) exactly as the guest runs: its namespace, its user,
    its view of the files."""
    link = link_of(stack, instance_id)
    command = stack.driver().inside(link, stack.driver().guest_dir(instance_id), [sys.executable, "-c", code])
    out = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result: dict[str, str] = json.loads(out.stdout)
    return result


def test_a_guest_in_its_own_namespace_provisions_over_tls_as_its_own_user(stack: NetnsStack) -> None:
    instance_id = unique_id("ns")
    out = stack.provision_netns(instance_id, "--datastore", "redis", "--user", f"app:{PASSWORD}")
    assert "ACTIVE" in out.stdout
    record = stack.client().hgetall(f"berth:instance:{instance_id}")
    assert record["status"] == "ACTIVE" and record["prepare_applied"] == "1", record
    link = link_of(stack, instance_id)
    pid = guest_pid(stack, instance_id)
    assert status_field(pid, "Uid") == str(link.uid) != "0"
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net"), "the guest shares our network"
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    urls = [item for item in env if item.startswith((b"CELERY_BROKER_URL=", b"CELERY_RESULT_BACKEND="))]
    assert urls and all(stack.network.gateway.encode() in url and b"s://" in url for url in urls), urls
    # `show` and `list` tell where it connects from, and that it is TLS: as the broker sees it.
    shown = json.loads(stack.cli("show", instance_id).stdout)
    assert (shown["guest_host"], shown["guest_transport"], shown["guest_connected"]) == (link.address, "tls", True)
    listed = stack.cli("list").stdout
    assert any(instance_id in line and link.address in line and "tls" in line for line in listed.splitlines()), listed
    # Its datastore answers at the guest's own address, across the bridge, with the prepared password.
    connection = shown["connection"]
    assert connection["host"] == link.address, connection
    datastore = redis.Redis(host=link.address, port=connection["port"], username="app", password=PASSWORD,
                            socket_connect_timeout=5)
    assert datastore.ping()
    # Its address is its own, and nothing but the bridge is routed.
    routes = subprocess.run(["ip", "-n", link.netns, "-4", "route"], capture_output=True, text=True).stdout
    assert "default" not in routes and link.address in subprocess.run(
        ["ip", "-n", link.netns, "-4", "addr"], capture_output=True, text=True).stdout
    # Delete takes the link and the namespace with it.
    assert stack.cli("delete", instance_id, "--wait").returncode == 0
    assert not Path(f"/run/netns/{link.netns}").exists()
    assert subprocess.run(["ip", "link", "show", link.host_veth], capture_output=True).returncode != 0


def listening(pid: int) -> set[str]:
    """The addresses process ``pid`` (and its children: RabbitMQ's helpers) accepts TCP connections on."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    pids = {str(pid), *Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    return {line.split()[3].rpartition(":")[0].strip("[]") for line in out.splitlines()
            if any(f"pid={p}," in line for p in pids)}


def test_the_broker_listens_on_loopback_and_the_bridge_only(stack: NetnsStack) -> None:
    servers = [stack.broker.store.process.pid] if stack.broker.store.process else []
    if stack.broker.node is not None and stack.broker.node.pid():
        servers.append(int(stack.broker.node.pid() or 0))
    assert servers
    for pid in servers:
        addresses = listening(pid)
        assert addresses and addresses <= {"127.0.0.1", stack.network.gateway}, (pid, addresses)
    assert stack.network.gateway in listening(servers[-1]), "guests could not reach the broker"


def test_a_guest_reads_nothing_of_the_control_plane_or_of_other_guests(stack: NetnsStack) -> None:
    mine, other = unique_id("ns"), unique_id("ns")
    for instance_id in (mine, other):
        stack.provision_netns(instance_id)
    taskmanager = stack.taskmanagers[0].pid
    probe = f"""
import json, os
def attempt(path, op):
    try:
        op(path)
        return "read"
    except OSError as exc:
        return type(exc).__name__
home = {str(stack.home)!r}
print(json.dumps({{
    "master_key": attempt(home + "/master.key", lambda p: open(p).read()),
    "home_listing": attempt(home, os.listdir),
    "taskmanager_environ": attempt("/proc/{taskmanager}/environ", lambda p: open(p).read()),
    "other_guest_disk": attempt(home + "/guests/{other}", os.listdir),
    "broker_secret": attempt({str(stack.broker.store.data_dir / "admin.secret")!r}, lambda p: open(p).read()),
    "tls_key": attempt({str(stack.broker.certs.key) if stack.broker.certs else ""!r}, lambda p: open(p).read()),
    "root_home": attempt("/root", os.listdir),
    "own_disk": attempt(home + "/guests/{mine}", os.listdir),
}}))
"""
    seen = as_guest(stack, mine, probe)
    assert seen.pop("own_disk") == "read", "the probe runs as the guest, on its own disk"
    assert all(result != "read" for result in seen.values()), seen
    assert (stack.home / "master.key").exists(), "the master key is there, only out of the guest's reach"


def test_nothing_secret_crosses_the_guest_link_in_the_clear(stack: NetnsStack) -> None:
    """Everything on the bridge while a guest is provisioned with a password: TLS records only."""
    captured = bytearray()
    stop = threading.Event()
    sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    sniffer.bind((stack.network.bridge, 0))
    sniffer.settimeout(0.2)

    def capture() -> None:
        while not stop.is_set():
            try:
                frame, (interface, *_) = sniffer.recvfrom(65535)
            except TimeoutError:
                continue
            # A packet socket queues whatever it saw before bind() too (loopback traffic of
            # other tests): only the bridge's frames count.
            if interface == stack.network.bridge:
                captured.extend(frame)

    thread = threading.Thread(target=capture, daemon=True)
    thread.start()
    instance_id = unique_id("wire")
    try:
        stack.provision_netns(instance_id, "--datastore", "redis", "--user", f"app:{PASSWORD}",
                              "--database", "orders")
        assert stack.cli("ping", instance_id).returncode == 0
    finally:
        stop.set()
        thread.join(5)
        sniffer.close()
    data = bytes(captured)
    assert len(data) > 10_000, f"only {len(data)} bytes seen on {stack.network.bridge}: the capture saw nothing"
    assert b"\x17\x03\x03" in data, "no TLS application data on the link"
    for secret in (PASSWORD.encode(), b"guest.prepare", b"guest.ping", b"orders", f"guest.{instance_id}".encode()):
        assert secret not in data, f"{secret!r} crossed the link in the clear"


def test_a_guest_off_loopback_without_tls_is_refused_at_boot(tmp_path: Path) -> None:
    stack = NetnsStack(tmp_path, tls=False)
    try:
        stack.start_taskmanager()
        instance_id = unique_id("clear")
        out = stack.cli("provision", instance_id, "--boot", "netns", "--wait", timeout_s=60)
        assert out.returncode != 0
        record = stack.client().hgetall(f"berth:instance:{instance_id}")
        assert record["status"] == "FAILED", record
        assert "without TLS" in record["error"] and stack.network.gateway in record["error"], record["error"]
        assert not Path(f"/run/netns/{stack.network.names(instance_id)[0]}").exists(), "a refused guest got a link"
    finally:
        stack.close()


def test_without_root_the_netns_driver_names_what_it_lacks(tmp_path: Path) -> None:
    """A process of root's without capabilities (as in a container) is refused, each lack named."""
    require_root()
    code = ("from berth.netns import require_privileges\n"
            "try:\n    require_privileges()\nexcept Exception as exc:\n    print(type(exc).__name__, exc)\n")
    out = subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.startswith(BootError.__name__), out.stdout + out.stderr
    for capability in ("CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_SETUID"):
        assert capability in out.stdout, out.stdout
    assert "run the taskmanager as root" in out.stdout


def test_guest_env_hands_a_hand_started_guest_the_brokers_ca(stack: NetnsStack) -> None:
    instance_id = unique_id("env")
    stack.cli("provision", instance_id, "--boot", "none")
    wait_until(lambda: stack.client().hget(f"berth:instance:{instance_id}", "booted_at"), 30,
               message="the instance booted (driver none)")
    env = stack.guest_env(instance_id)
    assert env["BERTH_BROKER_CA"].startswith("-----BEGIN CERTIFICATE-----")
    assert env["CELERY_BROKER_URL"].startswith(("rediss://", "amqps://"))
