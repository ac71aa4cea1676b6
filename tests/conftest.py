"""One real Redis per test session (per xdist worker), started before `tasks` is imported.

celeryconfig reads the environment at import time, so the broker URL and BERTH_HOME are
set in pytest_configure, before test modules are collected. A user's own broker given in
CELERY_BROKER_URL is used instead; every test names its own instances, so runs can share it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    FLOWER_AUTH,
    FlowerClient,
    Proc,
    celery,
    guest_command,
    guest_env,
    start_flower,
    unique_id,
    wait_until,
)

_session: dict[str, Any] = {}


def _xdist_controller(config: pytest.Config) -> bool:
    """True in the process that only hands tests to xdist workers (each worker has its own stack)."""
    return bool(getattr(config.option, "numprocesses", None)) and "PYTEST_XDIST_WORKER" not in os.environ


def pytest_configure(config: pytest.Config) -> None:
    from tests.brokers import TestBroker

    config.addinivalue_line("markers", "broker: broker-facing; `make test` runs these on Redis and on RabbitMQ")
    config.addinivalue_line("markers", "rabbitmq: about RabbitMQ itself; runs only with BERTH_TEST_BROKER=rabbitmq")
    config.addinivalue_line("markers", "redis: about the Redis broker itself; runs only on Redis")
    if _xdist_controller(config):
        return
    root = Path(tempfile.mkdtemp(prefix="berth-test-"))
    _session["root"] = root
    os.environ["BERTH_HOME"] = str(root / "home")
    if not os.environ.get("CELERY_BROKER_URL"):
        server = TestBroker(root).start()
        _session["server"] = server
        os.environ.update(server.env())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (not skip) what is about the other broker: each runs in its own session."""
    from tests.brokers import kind

    other = "redis" if kind() == "rabbitmq" else "rabbitmq"
    kept = [item for item in items if item.get_closest_marker(other) is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept


def pytest_unconfigure(config: pytest.Config) -> None:
    from tasks.drivers import LocalDriver

    if "root" not in _session:
        return
    LocalDriver().stop_all(timeout_s=3)
    if "server" in _session:
        _session["server"].stop()
    if "root" in _session:
        shutil.rmtree(_session["root"], ignore_errors=True)


@pytest.fixture(scope="session")
def session_root() -> Path:
    return Path(_session["root"])


@pytest.fixture(scope="session")
def taskmanager(session_root: Path) -> Iterator[Proc]:
    """A real taskmanager worker process (2 prefork slots), shared by the session; it also serves
    the guest API's queue (a separate worker in the Procfile)."""
    name = f"taskmanager-{os.getpid()}@%h"
    proc = Proc(celery("-A", "tasks", "worker", "-Q", "taskmanager,guestapi", "-c", "2", "-n", name,
                       "-E", "-l", "INFO"), session_root / "logs" / "taskmanager.log")
    wait_until(lambda: " ready." in proc.log() or not proc.alive(), 60, message="taskmanager ready")
    assert proc.alive(), proc.log()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def flower(session_root: Path) -> Iterator[FlowerClient]:
    """A real Flower (`celery -A tasks flower`) with basic auth, shared by the session."""
    proc, base = start_flower(session_root / "logs" / "flower.log", FLOWER_AUTH)
    yield FlowerClient(base)
    proc.stop()


@pytest.fixture
def new_id(request: pytest.FixtureRequest) -> Iterator[Callable[[str], str]]:
    """Fresh instance ids; their local guests are stopped when the test ends."""
    from tasks.drivers import LocalDriver

    made: list[str] = []

    def make(prefix: str = "t") -> str:
        made.append(unique_id(prefix))
        return made[-1]

    yield make
    for instance_id in made:
        LocalDriver().stop(instance_id, timeout_s=3)


@pytest.fixture
def start_guest(session_root: Path) -> Iterator[Callable[[str], Proc]]:
    """Start `celery -A guest worker --instance-id ID` by hand (the `none` boot driver's case)."""
    procs: list[Proc] = []

    def start(instance_id: str) -> Proc:
        proc = Proc(guest_command(instance_id), session_root / "logs" / f"guest-{instance_id}.log",
                    env=guest_env(instance_id))
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop(timeout_s=5)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Any]:
    """A private stack (broker, taskmanagers, BERTH_HOME) for a test that stops or reads its parts."""
    from tests.stack import Stack

    private = Stack(tmp_path)
    yield private
    private.close()


@pytest.fixture
def records() -> Any:
    from tasks.runtime import records as get

    return get()
