"""Test helpers: conditions with deadlines, unique ids, real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from berth.paths import PROJECT_DIR

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout_s: float = 20.0, interval_s: float = 0.05,
               message: str = "condition") -> T:
    """Poll condition until it returns something truthy; fail with message at the deadline."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last  # type: ignore[no-any-return]
        time.sleep(interval_s)
    raise AssertionError(f"{message} not met within {timeout_s:g} s (last value: {last!r})")


def unique_id(prefix: str = "t") -> str:
    """A fresh instance id: tests share one Redis, so every test names its own instances."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def project_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PROJECT_DIR)
    env.update(extra)
    return env


class Proc:
    """A real subprocess (worker, guest, CLI) with its output in a log file."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(args, cwd=PROJECT_DIR, env=env or project_env(), stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.pid, sig)

    def stop(self, timeout_s: float = 15.0) -> None:
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait()


def workflows_cli(*args: str, env: dict[str, str] | None = None, timeout_s: float = 90,
                  stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m workflows ARGS` as a user runs it (``stdin``: what it reads, a password say)."""
    return subprocess.run([sys.executable, "-m", "workflows", *args], input=stdin, capture_output=True, text=True,
                          cwd=PROJECT_DIR, env=env or project_env(), timeout=timeout_s)


def guest_journal(instance_id: str, home: Path | None = None) -> dict[str, Any]:
    """A local guest's prepare journal ({} before its first prepare)."""
    from tasks.drivers import LocalDriver

    path = LocalDriver(home).guest_dir(instance_id) / "prepare.json"
    return dict(json.loads(path.read_text())) if path.exists() else {}


def celery(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", *args]


def guest_command(instance_id: str) -> list[str]:
    from guest.launch import agent_command

    return agent_command(instance_id)


def guest_identity(instance_id: str) -> tuple[dict[str, str], Any]:
    """The settings and key of the guest of instance_id, on the session's broker.

    From its record when it was provisioned; otherwise (a test that only declares a queue) its
    broker user is minted for a test request, as create_queue would.
    """
    from berth.keys import guest_key
    from tasks.runtime import broker, guest_env, records

    record = records().get(instance_id)
    request_id = record["request_id"] if record is not None else f"test-{instance_id}"
    if record is None:
        broker().mint_guest(instance_id, request_id)
    env = guest_env(instance_id, request_id)
    return env, guest_key(instance_id, request_id)


def drop_guest_queue(instance_id: str) -> None:
    """Make guest.ID vanish behind the taskmanager's back, on whichever broker the session runs."""
    from berth.brokers import RabbitBroker
    from berth.ids import binding_keys
    from tasks.runtime import broker, redis_client

    current = broker()
    if isinstance(current, RabbitBroker):
        current.topology.remove(instance_id)
    else:
        redis_client().delete(*binding_keys(instance_id))


def guest_env(instance_id: str) -> dict[str, str]:
    """The environment a guest started by hand gets: the project's, with its own user and key."""
    return project_env(**guest_identity(instance_id)[0])


def send_to_guest(instance_id: str, task: str, name: str, kwargs: dict[str, Any] | None = None,
                  expires_s: float = 30.0, expires: Any = None) -> Any:
    """Publish task to the guest's queue as the taskmanager does: signed, id ``<id>.guest.<name>``."""
    import datetime as dt

    from berth.ids import guest_task_prefix
    from tasks import channel

    when = expires or dt.datetime.now(dt.UTC) + dt.timedelta(seconds=expires_s)
    return channel.publish(instance_id, task,
                          kwargs={"instance_id": instance_id} if kwargs is None else kwargs,
                          task_id=f"{guest_task_prefix(instance_id)}{name}", expires=when,
                          key=guest_identity(instance_id)[1])


def wait_for_status(records: Any, instance_id: str, statuses: Any = ("ACTIVE", "FAILED"),
                    timeout_s: float = 60.0) -> Any:
    """The instance record once its status is one of statuses."""
    wanted = {str(s) for s in statuses}

    def reached() -> Any:
        record = records.get(instance_id)
        return record if record is not None and record.status.value in wanted else None

    return wait_until(reached, timeout_s, message=f"{instance_id} in {sorted(wanted)}")


# The password the test session's Flower asks for (conftest's ``flower`` fixture).
FLOWER_AUTH = "admin:flower-test-pw"


def basic_auth(auth: str = FLOWER_AUTH) -> str:
    import base64

    return "Basic " + base64.b64encode(auth.encode()).decode()


class FlowerClient:
    """Flower's HTTP API and pages, with the session's credentials (or without, to see it refuse)."""

    def __init__(self, base: str, auth: str = FLOWER_AUTH) -> None:
        self.base, self.auth = base, auth

    def call(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """GET (or POST with a JSON body) an API path; its JSON answer."""
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method="POST" if data else "GET",
                                         headers={"Authorization": basic_auth(self.auth),
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def raw(self, path: str) -> str:
        """A page or API answer as text, with credentials."""
        return self.get(path)[1]

    def get(self, path: str, *, auth: bool = True) -> tuple[int, str]:
        """The status and text of a GET, with the credentials or without them."""
        import urllib.error
        import urllib.request

        headers = {"Authorization": basic_auth(self.auth)} if auth else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(self.base + path, headers=headers),
                                        timeout=10) as response:
                return int(response.status), str(response.read().decode())
        except urllib.error.HTTPError as exc:
            return int(exc.code), ""

    def status_without_auth(self, path: str) -> int:
        return self.get(path, auth=False)[0]


def start_flower(log_path: Path, auth: str, **env: str) -> tuple[Proc, str]:
    """A real Flower (`celery -A tasks flower`) with basic auth on a free port, once it answers; its base URL."""
    import urllib.request

    from berth.redis_server import free_port

    port = free_port()
    proc = Proc(celery("-A", "tasks", "flower", "--address=127.0.0.1", f"--port={port}"), log_path,
                env=project_env(FLOWER_BASIC_AUTH=auth, **env))
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            with urllib.request.urlopen(base + "/healthcheck", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    wait_until(up, 60, interval_s=0.2, message="flower answering")
    return proc, base


# --- Message envelopes on a guest queue, as kombu's Redis transport keeps them --------------------

Envelope = dict[str, Any]


def push_envelope(client: Any, instance_id: str, item: bytes | Envelope) -> None:
    """What kombu's Redis transport does to publish (``_put``): LPUSH onto the queue's list."""
    from berth.ids import guest_queue

    client.lpush(guest_queue(instance_id), item if isinstance(item, bytes) else json.dumps(item))


def pop_envelope(client: Any, instance_id: str) -> Envelope:
    """Take the oldest message waiting in guest.ID off its list (no guest consumes it yet)."""
    from berth.ids import guest_queue

    item = client.rpop(guest_queue(instance_id))
    assert item is not None, f"no message waits in guest.{instance_id}"
    return dict(json.loads(item))


def celery_body(*, args: Any = (), kwargs: Any = None, embed: Any = None) -> bytes:
    """A Celery protocol-2 body: (args, kwargs, embed) as JSON."""
    return json.dumps([list(args), kwargs or {}, embed]).encode()


def body_of(message: Envelope) -> Any:
    import base64

    return json.loads(base64.b64decode(message["body"]))


def with_body(message: Envelope, body: Any) -> Envelope:
    import base64
    import copy

    changed = copy.deepcopy(message)
    changed["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    return changed
