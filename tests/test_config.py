"""Settings that could lose or repeat work are refused at start-up, naming what conflicts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import celeryconfig
from berth.certs import ensure_certificates
from berth.config import check_settings
from berth.paths import PROJECT_DIR
from berth.tls import load_ca
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
    conf = {**settings(), "broker_url": "amqps://berth:secret@rabbit.example:5671/berth",
            "result_backend": "rediss://:secret@redis.example:6379/0", "berth_queue_type": "quorum"}
    return {**conf, "broker_transport_options": transport, **changes}


def test_rabbitmq_with_confirms_and_a_redis_store_is_safe() -> None:
    assert check_settings(rabbitmq_settings()) == []
    # A cluster's failover list of URLs, too.
    assert check_settings(rabbitmq_settings(broker_url="amqps://a:b@h1:5671//;amqps://a:b@h2:5671//")) == []


@pytest.mark.parametrize(("changes", "named"), [
    ({"transport": {"confirm_publish": False}}, ["confirm_publish", "lost silently"]),
    ({"transport": {"confirm_timeout": None}}, ["confirm_timeout", "forever"]),
    ({"transport": {"confirm_timeout": 0}}, ["confirm_timeout"]),
    ({"result_backend": "rpc://"}, ["result_backend", "'rpc'"]),
    ({"result_backend": "amqp://berth:secret@rabbit.example//"}, ["result_backend", "'amqp'"]),
    ({"berth_queue_type": "stream"}, ["berth_queue_type", "BERTH_QUEUE_TYPE", "'stream'"]),
    ({"task_acks_late": False}, ["task_acks_late"]),
    ({"broker_url": "amqps://a:b@h1:5671//;amqp://a:b@h2:5672//"}, ["broker_url", "h1, h2", "without TLS"]),
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


@pytest.mark.parametrize(("url", "refused"), [
    ("redis://:pw@10.213.0.1:6379/0", True),
    ("amqp://u:pw@broker.example:5672//", True),
    ("rediss://:pw@10.213.0.1:6379/0", False),
    ("amqps://u:pw@broker.example:5671//", False),
    ("redis://:pw@127.0.0.1:6379/0", False),
    ("redis://:pw@localhost:6379/0", False),
    ("amqp://u:pw@[::1]:5672//", False),
])
def test_a_connection_off_loopback_must_be_tls(url: str, refused: bool) -> None:
    """Off loopback, broker passwords and prepare's secrets would cross a network: TLS or an explicit yes."""
    backend = url if url.startswith("redis") else "rediss://:pw@10.213.0.1:6379/0"
    problems = [p for p in check_settings(settings(broker_url=url, result_backend=backend)) if "without TLS" in p]
    assert bool(problems) == refused, problems
    if refused:
        assert "BERTH_ALLOW_CLEARTEXT" in problems[0] and "broker_url" in problems[0]
        allowed = settings(broker_url=url, result_backend=backend, berth_allow_cleartext=True)
        assert not [p for p in check_settings(allowed) if "without TLS" in p]


def test_a_tls_url_makes_every_client_verify_the_broker(tmp_path: Path) -> None:
    """celeryconfig with rediss:// and amqps://: certificates are required, against BERTH_BROKER_CA."""
    certs = ensure_certificates(tmp_path / "tls", ["10.213.0.1"])
    code = ("import json, celeryconfig as c; print(json.dumps([str(c.broker_use_ssl), "
            "str(getattr(c, 'redis_backend_use_ssl', None))]))")
    for broker, expected in (("rediss://:pw@10.213.0.1:1/0", "ssl_cert_reqs"),
                             ("amqps://u:p@10.213.0.1:1//", "cadata")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_DIR, timeout=60,
                             env=project_env(CELERY_BROKER_URL=broker, CELERY_RESULT_BACKEND="rediss://:pw@10.213.0.1:1/0",
                                             BERTH_BROKER_CA=str(certs.ca)))
        assert out.returncode == 0, out.stderr
        broker_ssl, backend_ssl = json.loads(out.stdout)
        assert expected in broker_ssl and "BEGIN CERTIFICATE" in broker_ssl
        assert "VerifyMode.CERT_REQUIRED" in backend_ssl and "BEGIN CERTIFICATE" in backend_ssl


def test_a_broker_ca_that_is_neither_pem_nor_a_file_is_named() -> None:
    with pytest.raises(ValueError, match="BERTH_BROKER_CA='/nowhere/ca.pem' is neither"):
        load_ca("/nowhere/ca.pem")


def test_the_brokers_certificate_is_issued_again_for_a_new_address(tmp_path: Path) -> None:
    first = ensure_certificates(tmp_path, ["10.1.0.1"])
    ca, cert = first.ca.read_bytes(), first.cert.read_bytes()
    assert ensure_certificates(tmp_path, ["10.1.0.1"]).cert.read_bytes() == cert, "kept while it covers the hosts"
    again = ensure_certificates(tmp_path, ["10.2.0.1"])
    assert again.cert.read_bytes() != cert and again.ca.read_bytes() == ca, "a new certificate, the same CA"
    for path in (again.ca, again.cert, again.key, tmp_path / "ca.key"):
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
