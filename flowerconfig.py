"""Flower's settings (read from the project folder by `celery -A tasks flower`).

Flower never runs open: with no ``FLOWER_BASIC_AUTH=user:password`` in the environment, it
requires user ``admin`` with a random password kept in ``$BERTH_HOME/flower.auth`` (mode 0600,
made on first start). Flower serves ``/metrics`` and ``/healthcheck`` without authentication
all the same: see the README's threat model.
"""

from __future__ import annotations

import os
import secrets
import sys

from berth.paths import berth_home, create_once

if not os.environ.get("FLOWER_BASIC_AUTH"):
    _auth_file = berth_home() / "flower.auth"
    basic_auth = [create_once(_auth_file, f"admin:{secrets.token_urlsafe(12)}\n").strip()]
    print(f"flower: basic auth required (user admin; password in {_auth_file})", file=sys.stderr)
