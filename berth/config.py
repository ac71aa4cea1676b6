"""Settings that are safe only together, checked at start-up.

Each rule names the settings in conflict and why the combination could lose or repeat work.
The taskmanager refuses to start and the command line refuses to send on any violation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

REDIS_SCHEMES = ("redis", "rediss")
# A prepare must be long finished before Redis hands its message to another consumer.
VISIBILITY_MARGIN_S = 60.0


def _transport(conf: Mapping[str, Any]) -> Mapping[str, Any]:
    return conf.get("broker_transport_options") or {}


def check_settings(conf: Mapping[str, Any]) -> list[str]:
    """Every problem with this combination of settings (empty when it is safe)."""
    problems = []
    for name in ("broker_url", "result_backend"):
        scheme = urlparse(str(conf.get(name) or "")).scheme
        if scheme not in REDIS_SCHEMES:
            problems.append(f"{name} must be a Redis URL (redis:// or rediss://), got scheme {scheme!r}: "
                            "guest queues, instance records and guest answers are read from Redis")
    transport = _transport(conf)
    if transport.get("global_keyprefix"):
        problems.append("broker_transport_options.global_keyprefix is not supported: per-guest keys "
                        "are named without it")
    visibility = float(transport.get("visibility_timeout", 3600))
    longest = max(float(conf["berth_prepare_deadline_max_s"]), float(conf["berth_ping_deadline_max_s"]))
    if visibility < longest + VISIBILITY_MARGIN_S:
        problems.append(f"visibility_timeout ({visibility:g} s, BERTH_VISIBILITY_TIMEOUT_S) must exceed the "
                        f"longest deadline ({longest:g} s, BERTH_PREPARE_DEADLINE_MAX_S / BERTH_PING_DEADLINE_MAX_S) "
                        f"by {VISIBILITY_MARGIN_S:g} s, or a slow prepare is handed to a second consumer while "
                        "the first still runs it")
    for prefix in ("ping", "verify"):
        cap = float(conf[f"berth_{prefix}_backoff_cap_s"])
        if cap * 10 > visibility:
            problems.append(f"berth_{prefix}_backoff_cap_s ({cap:g} s) must stay far below visibility_timeout "
                            f"({visibility:g} s): a retry waiting for its countdown is an unacknowledged message")
        if cap <= 0 or float(conf[f"berth_{prefix}_backoff_base_s"]) <= 0:
            problems.append(f"berth_{prefix}_backoff_base_s and _cap_s must be positive")
    expires = float(conf.get("result_expires") or 0)
    needed = float(conf["berth_ping_deadline_max_s"]) + float(conf["berth_prepare_deadline_max_s"])
    if 0 < expires < needed:
        problems.append(f"result_expires ({expires:g} s, BERTH_RESULT_EXPIRES_S) must outlive a whole build "
                        f"({needed:g} s of ping and prepare deadlines), or a guest's answer expires unread")
    return problems


class UnsafeSettings(ValueError):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("unsafe settings:\n  - " + "\n  - ".join(problems))
        self.problems = problems


def ensure_safe(conf: Mapping[str, Any]) -> None:
    problems = check_settings(conf)
    if problems:
        raise UnsafeSettings(problems)
