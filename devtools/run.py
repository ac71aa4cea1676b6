"""`make run`: the whole of Berth on this machine, with a demo instance, until Ctrl-C.

Starts the embedded broker (unless CELERY_BROKER_URL names one; with BERTH_BROKER=rabbitmq a
private RabbitMQ node, with the embedded Redis beside it for records and answers), the
taskmanager, the guest API's worker and Flower
from the Procfile with honcho, provisions a demo instance with a local guest and a real
Redis datastore, prints each status change, how to connect, and Flower's address, then
waits. Ctrl-C stops everything it started, local guests included.

With ``BERTH_GUESTS=netns`` (as root) guests boot with the netns driver: each in a network
namespace on the bridge, reaching the broker over TLS at the bridge's address (docs/network.md).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from base64 import b64encode
from pathlib import Path
from typing import Any

from berth.certs import Certificates
from berth.errors import BootError
from berth.netns import Network, require_privileges
from berth.paths import PROJECT_DIR, berth_home, broker_dir, broker_url_file, rabbitmq_api_file, result_url_file
from berth.redis_server import free_port, redis_cli_command
from devtools.broker import admin_url, guest_facing, private_dir, wait_until_ready
from devtools.rabbitmq import RabbitNode, rabbitmq_dir

READY_TIMEOUT_S = 60.0
DEMO_USER = "app"
DEMO_DATABASE = "app"


def port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def environment(home: Path) -> tuple[dict[str, str], list[str]]:
    """The environment for honcho's processes, and which Procfile processes to start."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env.update(BERTH_HOME=str(home), PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
               PYTHONPATH=str(PROJECT_DIR), PYTHONUNBUFFERED="1")
    env.setdefault("BERTH_GUEST_STOP_TIMEOUT_S", "3")
    processes = ["taskmanager", "guestapi", "flower"]
    if env.get("BERTH_BROKER", "redis") not in ("redis", "rabbitmq"):
        raise SystemExit(f"error: BERTH_BROKER={env['BERTH_BROKER']!r}: expected redis or rabbitmq")
    if guests() not in ("local", "netns"):
        raise SystemExit(f"error: BERTH_GUESTS={guests()!r}: expected local or netns")
    if not env.get("CELERY_BROKER_URL"):
        port = free_port()
        env["BERTH_BROKER_PORT"] = str(port)
        private_dir(broker_dir())
        tls = None
        if guests() == "netns":
            tls = guest_network(env)
        env["CELERY_BROKER_URL"] = admin_url(port, broker_dir(), tls=tls is not None)
        processes.insert(0, "broker")
        if env.get("BERTH_BROKER") == "rabbitmq":
            node = RabbitNode(rabbitmq_dir(), tls=tls, bind=(Network.from_env().gateway,) if tls else ())
            env.update(BERTH_RABBITMQ_PORT=str(node.amqp_port), BERTH_RABBITMQ_API_PORT=str(node.api_port),
                       BERTH_RABBITMQ_DIST_PORT=str(node.dist_port), CELERY_RESULT_BACKEND=env["CELERY_BROKER_URL"],
                       CELERY_BROKER_URL=node.url, BERTH_RABBITMQ_API=node.api)
            processes.insert(1, "rabbitmq")
    env.setdefault("FLOWER_PORT", "5555" if port_free(5555) else str(free_port()))
    env.setdefault("FLOWER_BASIC_AUTH", f"admin:{secrets.token_urlsafe(12)}")
    return env, processes


def guests() -> str:
    """How `make run` boots guests: local (the default) or netns (BERTH_GUESTS)."""
    return os.environ.get("BERTH_GUESTS") or "local"


def guest_network(env: dict[str, str]) -> Certificates:
    """netns guests: the bridge, and the broker's certificates naming its address (BERTH_BROKER_BIND)."""
    try:
        require_privileges()
        network = Network.from_env()
        network.ensure_bridge()
    except BootError as exc:
        raise SystemExit(f"error: BERTH_GUESTS=netns: {exc}") from None
    env["BERTH_BROKER_BIND"] = network.gateway
    os.environ["BERTH_BROKER_BIND"] = network.gateway
    tls, _ = guest_facing()
    assert tls is not None
    env["BERTH_BROKER_CA"] = str(tls.ca)
    return tls


def wait_for(what: str, check: Any, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet, whatever the reason
            pass
        time.sleep(0.2)
    raise SystemExit(f"error: {what} did not come up within {timeout_s:g} s; see {berth_home() / 'run.log'}")


def flower_up(port: str, auth: str) -> bool:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/workers",
                                     headers={"Authorization": "Basic " + b64encode(auth.encode()).decode()})
    with urllib.request.urlopen(request, timeout=2) as response:
        return bool(response.status == 200)


def taskmanager_up() -> bool:
    from tasks import app

    replies = app.control.inspect(timeout=1.0).ping() or {}
    return all(any(name.startswith(f"{worker}@") for name in replies) for worker in ("taskmanager", "guestapi"))


def next_demo_id() -> str:
    from tasks.runtime import records

    n = 1
    while records().get(f"demo-{n}") is not None:
        n += 1
    return f"demo-{n}"


def provision_demo(password: str) -> str | None:
    from tasks import app
    from workflows.cli import follow

    instance_id = next_demo_id()
    request = {"datastore": "redis", "boot": guests(), "boot_delay_s": 2.0,
               "users": [{"name": DEMO_USER, "password": password}], "databases": [DEMO_DATABASE]}
    where = "in a network namespace of its own" if guests() == "netns" else "local"
    print(f"\nprovisioning {instance_id}: redis datastore, {where} guest booting in 2 s", flush=True)
    sent = app.send_task("workflows.provision", args=[instance_id], kwargs=request)
    code = follow(instance_id, sent, timeout_s=120)
    return instance_id if code == 0 else None


def show_connection(instance_id: str, password: str) -> None:
    import redis

    from tasks.runtime import records

    record = records().get(instance_id)
    assert record is not None
    conn = record["connection"]
    client = redis.Redis(host=conn["host"], port=conn["port"], username=DEMO_USER, password=password,
                         decode_responses=True)
    client.set(f"{DEMO_DATABASE}:greeting", "hello from berth")
    print(f"\nconnected as {DEMO_USER}: {DEMO_DATABASE}:greeting = {client.get(f'{DEMO_DATABASE}:greeting')!r}")
    print(f"connect yourself:  {redis_cli_command()} -h {conn['host']} -p {conn['port']} --user {DEMO_USER} "
          f"--pass '{password}' GET {DEMO_DATABASE}:greeting")
    print(f"instance record:   python -m workflows show {instance_id}")
    print(f"guest API:         python -m workflows users {instance_id}   (also: status, restart, databases, ...)")
    print(f"metrics:           http://127.0.0.1:{os.environ.get('FLOWER_PORT', '5555')}/metrics  (berth_* next to "
          "Flower's own)")


def stop(honcho: subprocess.Popen[bytes]) -> None:
    print("\nstopping taskmanager, flower, guests and broker ...", flush=True)
    if honcho.poll() is None:
        honcho.send_signal(signal.SIGTERM)
        try:
            honcho.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(honcho.pid, signal.SIGKILL)
            honcho.wait()
    from tasks.drivers import DRIVERS, LocalDriver, NetnsDriver

    LocalDriver().stop_all()
    netns = DRIVERS["netns"]
    if isinstance(netns, NetnsDriver):
        for instance_id in netns.linked():
            netns.network().detach(instance_id)  # the disk and its address stay for the next run
    for started in (broker_url_file(), result_url_file(), rabbitmq_api_file()):
        started.unlink(missing_ok=True)
    print("stopped.", flush=True)


def main() -> int:
    home = berth_home()
    home.mkdir(parents=True, exist_ok=True)
    env, processes = environment(home)
    os.environ.update(env)  # before `tasks` is imported: celeryconfig reads the environment
    log_path = home / "run.log"
    print(f"berth: starting {', '.join(processes)} (logs: {log_path})", flush=True)
    with open(log_path, "ab") as log:
        honcho = subprocess.Popen(
            [str(Path(sys.executable).parent / "honcho"), "-f", str(PROJECT_DIR / "Procfile"),
             "-d", str(PROJECT_DIR), "start", *processes],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    # Ctrl-C stops everything even when this process was started with SIGINT ignored (a shell's
    # background job is).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if "broker" in processes:
            tls = "BERTH_BROKER_CA" in env
            wait_until_ready(admin_url(int(env["BERTH_BROKER_PORT"]), broker_dir(), tls=tls), timeout_s=READY_TIMEOUT_S,
                             ca_pem=Path(env["BERTH_BROKER_CA"]).read_text() if tls else None)
        if "rabbitmq" in processes:
            RabbitNode(rabbitmq_dir(), ports=(int(env["BERTH_RABBITMQ_PORT"]), int(env["BERTH_RABBITMQ_API_PORT"]),
                                              int(env["BERTH_RABBITMQ_DIST_PORT"]))).wait_ready()
        from kombu.utils.url import maybe_sanitize_url

        shown = ";".join(str(maybe_sanitize_url(url)) for url in env["CELERY_BROKER_URL"].split(";"))
        print(f"broker:      {shown}", flush=True)
        wait_for("the taskmanager", taskmanager_up)
        print("taskmanager: ready (celery -A tasks worker -Q taskmanager; guest API: -Q guestapi)", flush=True)
        wait_for("Flower", lambda: flower_up(env["FLOWER_PORT"], env["FLOWER_BASIC_AUTH"]))
        user, _, flower_password = env["FLOWER_BASIC_AUTH"].partition(":")
        print(f"flower:      http://127.0.0.1:{env['FLOWER_PORT']}/  (user {user}, password {flower_password})",
              flush=True)
        password = secrets.token_urlsafe(12)
        instance_id = provision_demo(password)
        if instance_id:
            show_connection(instance_id, password)
        print(f"\nflower:      http://127.0.0.1:{env['FLOWER_PORT']}/tasks  (user {user}, password {flower_password})")
        print("running; press Ctrl-C to stop everything.", flush=True)
        while honcho.poll() is None:
            time.sleep(0.5)
        print(f"a process exited; see {log_path}", flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop(honcho)


if __name__ == "__main__":
    sys.exit(main())
