"""Flower's settings (read from the project folder by `celery -A tasks flower`).

Flower never runs open: with no ``FLOWER_BASIC_AUTH=user:password`` in the environment, it
requires user ``admin`` with a random password kept in ``$BERTH_HOME/flower.auth`` (mode 0600,
made on first start). Flower serves ``/metrics`` and ``/healthcheck`` without authentication
all the same: see docs/isolation.md (Flower, threat model).

Berth's own series (``berth_*``, `berth.metrics`) are registered here into prometheus_client's
default registry, so Flower's ``/metrics`` serves them next to its ``flower_*`` series; they are
read from the broker's Redis at each scrape.
"""

from __future__ import annotations

import os
import secrets
import sys

from berth.metrics import register as _register_berth_metrics
from berth.paths import berth_home, create_once
from tasks.runtime import redis_client

if not os.environ.get("FLOWER_BASIC_AUTH"):
    _auth_file = berth_home() / "flower.auth"
    basic_auth = [create_once(_auth_file, f"admin:{secrets.token_urlsafe(12)}\n").strip()]
    print(f"flower: basic auth required (user admin; password in {_auth_file})", file=sys.stderr)

# Once per process, however often this file is executed.
_register_berth_metrics(redis_client)
