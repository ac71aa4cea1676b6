"""Settings that could lose or repeat work are refused at start-up, naming what conflicts."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

import celeryconfig
from berth.config import check_settings
from berth.paths import PROJECT_DIR
from tests.helpers import celery, project_env


def settings(**changes: Any) -> dict[str, Any]:
    conf = {name: getattr(celeryconfig, name) for name in dir(celeryconfig) if not name.startswith("_")}
    transport = dict(conf["broker_transport_options"], **changes.pop("transport", {}))
    return {**conf, "broker_transport_options": transport, **changes}


def test_the_shipped_defaults_are_safe() -> None:
    assert check_settings(settings()) == []


@pytest.mark.parametrize(("changes", "named"), [
    ({"transport": {"visibility_timeout": 600}}, ["visibility_timeout", "BERTH_PREPARE_DEADLINE_MAX_S"]),
    ({"berth_ping_backoff_cap_s": 1000.0}, ["berth_ping_backoff_cap_s", "visibility_timeout"]),
    ({"result_expires": 60}, ["result_expires", "ping and prepare deadlines"]),
    ({"result_backend": "rpc://"}, ["result_backend", "'rpc'"]),
    ({"broker_url": "amqp://guest@localhost//"}, ["broker_url", "'amqp'"]),
    ({"transport": {"global_keyprefix": "x"}}, ["global_keyprefix"]),
    ({"berth_verify_backoff_base_s": 0.0}, ["berth_verify_backoff_base_s"]),
    ({"berth_shutdown_deadline_s": 4000.0}, ["visibility_timeout", "BERTH_SHUTDOWN_DEADLINE_S"]),
    ({"berth_chain_stop_wait_s": 5.0}, ["berth_chain_stop_wait_s", "countdown of a chain step", "outlive"]),
    ({"berth_node_lease_s": 0.5}, ["berth_node_lease_s"]),
])
def test_an_unsafe_combination_is_refused_naming_the_settings(changes: dict[str, Any], named: list[str]) -> None:
    problems = check_settings(settings(**changes))
    assert problems, "refused"
    assert any(all(word in problem for word in named) for problem in problems), problems


def test_the_taskmanager_refuses_to_start_with_unsafe_settings() -> None:
    env = project_env(BERTH_VISIBILITY_TIMEOUT_S="120")
    out = subprocess.run(celery("-A", "tasks", "worker", "-Q", "taskmanager", "--pool", "solo"), capture_output=True,
                         text=True, cwd=PROJECT_DIR, env=env, timeout=60)
    assert out.returncode != 0
    assert "taskmanager refused to start: unsafe settings" in out.stderr
    assert "visibility_timeout (120 s, BERTH_VISIBILITY_TIMEOUT_S)" in out.stderr


def test_the_command_line_refuses_to_send_with_unsafe_settings() -> None:
    out = subprocess.run([sys.executable, "-m", "workflows", "list"], capture_output=True, text=True,
                         cwd=PROJECT_DIR, env=project_env(BERTH_RESULT_EXPIRES_S="5"), timeout=60)
    assert out.returncode == 2 and "result_expires (5 s, BERTH_RESULT_EXPIRES_S)" in out.stderr
