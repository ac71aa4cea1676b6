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
    ({"broker_url": "sqs://key:secret@"}, ["broker_url", "'sqs'"]),
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


def rabbitmq_settings(**changes: Any) -> dict[str, Any]:
    """The shipped settings as they are with CELERY_BROKER_URL=amqp://... (celeryconfig's RabbitMQ branch)."""
    transport = {"confirm_publish": True, "confirm_timeout": 10.0, **changes.pop("transport", {})}
    conf = {**settings(), "broker_url": "amqp://berth:secret@rabbit.example:5672/berth",
            "result_backend": "redis://:secret@redis.example:6379/0", "berth_queue_type": "quorum"}
    return {**conf, "broker_transport_options": transport, **changes}


def test_rabbitmq_with_confirms_and_a_redis_store_is_safe() -> None:
    assert check_settings(rabbitmq_settings()) == []
    # A cluster's failover list of URLs, too.
    assert check_settings(rabbitmq_settings(broker_url="amqp://a:b@h1:5672//;amqp://a:b@h2:5672//")) == []


@pytest.mark.parametrize(("changes", "named"), [
    ({"transport": {"confirm_publish": False}}, ["confirm_publish", "lost silently"]),
    ({"transport": {"confirm_timeout": None}}, ["confirm_timeout", "forever"]),
    ({"transport": {"confirm_timeout": 0}}, ["confirm_timeout"]),
    ({"result_backend": "rpc://"}, ["result_backend", "'rpc'"]),
    ({"result_backend": "amqp://berth:secret@rabbit.example//"}, ["result_backend", "'amqp'"]),
    ({"berth_queue_type": "stream"}, ["berth_queue_type", "BERTH_QUEUE_TYPE", "'stream'"]),
    ({"task_acks_late": False}, ["task_acks_late"]),
])
def test_an_unsafe_rabbitmq_combination_is_refused_naming_the_settings(changes: dict[str, Any],
                                                                      named: list[str]) -> None:
    problems = check_settings(rabbitmq_settings(**changes))
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
