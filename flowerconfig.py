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

from berth.paths import berth_home

if not os.environ.get("FLOWER_BASIC_AUTH"):
    _auth_file = berth_home() / "flower.auth"
    if not _auth_file.exists():
        _auth_file.parent.mkdir(parents=True, exist_ok=True)
        _fd = os.open(_auth_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(_fd, "w") as _handle:
            _handle.write(f"admin:{secrets.token_urlsafe(12)}\n")
    basic_auth = [_auth_file.read_text().strip()]
    print(f"flower: basic auth required (user admin; password in {_auth_file})", file=sys.stderr)
