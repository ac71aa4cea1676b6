"""TLS between guests and the broker: the client options every connection of Berth's uses once a
URL says ``rediss://`` or ``amqps://``. A client verifies the broker against ``BERTH_BROKER_CA``
(the CA's PEM text, or a path to it), or against the system's CAs when that is unset: never not
at all. The CA and the broker's certificate are made by `berth.certs`.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

TLS_REDIS_SCHEMES = ("rediss",)
TLS_AMQP_SCHEMES = ("amqps",)
PLAIN_SCHEMES = ("redis", "amqp", "pyamqp")


# --- Clients ----------------------------------------------------------------------------------

def load_ca(value: str | None) -> str | None:
    """``BERTH_BROKER_CA``: PEM text as it is, or the PEM text of the file it names."""
    if not value:
        return None
    if value.lstrip().startswith("-----BEGIN"):
        return value
    try:
        return Path(value).read_text()
    except OSError as exc:
        raise ValueError(f"BERTH_BROKER_CA={value!r} is neither a PEM certificate nor a readable file: "
                         f"{exc.strerror}") from exc


def scheme(url: str) -> str:
    return url.split(":", 1)[0].lower()


def uses_tls(url: str) -> bool:
    """Whether every URL of ``url`` (a ``;`` failover list) speaks TLS."""
    return all(scheme(part) in TLS_REDIS_SCHEMES + TLS_AMQP_SCHEMES for part in url.split(";") if part)


def redis_ssl(url: str, ca_pem: str | None) -> dict[str, Any]:
    """redis-py's keyword arguments for ``url``: nothing for redis://, a verified TLS for rediss://."""
    if scheme(url) not in TLS_REDIS_SCHEMES:
        return {}
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_data": ca_pem} if ca_pem else \
        {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def amqp_ssl(ca_pem: str | None) -> dict[str, Any]:
    """py-amqp's ``ssl`` option: the broker's certificate must chain to the CA (the system's when
    there is none). The private CA signs brokers only; a cluster's nodes share one certificate
    that names them all, so the host is not matched again here."""
    context: dict[str, Any] = {"check_hostname": False}
    if ca_pem:
        context["cadata"] = ca_pem
    return {"context": context}


def hosts_of(url: str) -> list[str]:
    """The hosts of every URL of ``url`` (a ``;`` failover list)."""
    return [urlsplit(part).hostname or "" for part in url.split(";") if part]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@functools.cache
def process_ca() -> str | None:
    """This process's ``BERTH_BROKER_CA`` (as celeryconfig reads it)."""
    return load_ca(os.environ.get("BERTH_BROKER_CA"))


# A new connection costs no round trip of its own: redis-py 8 opens each one with HELLO 3, CLIENT
# MAINT_NOTIFICATIONS and two CLIENT SETINFO (four round trips before the first command), and a
# subscriber's connection is new each time (`tasks.waiting`). Berth needs nothing of RESP3.
CONNECTION_DEFAULTS: dict[str, Any] = {"protocol": 2, "driver_info": None}


def redis_from_url(url: str, **kwargs: Any) -> redis.Redis:
    """``redis.Redis.from_url`` that verifies a rediss:// server against this process's CA."""
    return redis.Redis.from_url(url, **redis_ssl(url, process_ca()), **{**CONNECTION_DEFAULTS, **kwargs})
