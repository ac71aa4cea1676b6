"""Keys: the control plane's master key, and what it derives for each guest.

The taskmanager (and every control-plane process on its hosts: the command line, Flower) holds
one master key: ``BERTH_MASTER_KEY`` (43 characters of url-safe base64, the same on every
taskmanager host) or, by default, ``$BERTH_HOME/master.key``, created on first use, mode 0600.
Nothing derived from it is stored anywhere; it is derived again when needed:

- per instance and provisioning request, the **guest key** (`GuestKey`), handed to that guest
  only (through its boot driver or `python -m workflows guest-env`). It signs every message sent
  to the guest (`GuestKey.sign`) and seals prepare's passwords for it (`GuestKey.seal`). A new
  provisioning of the same instance id gets a new key;
- per instance and request, the password of the guest's own Redis ACL user (`acl_password`);
- the **at-rest key**, which seals passwords while they wait in Redis for send_prepare, and in
  the provisioning message itself (`seal_at_rest`).

A guest holds only its own guest key and broker password: it cannot derive another's.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from berth.errors import KeyProblem, SealError
from berth.ids import FINGERPRINT_KEY
from berth.paths import berth_home, create_once

if TYPE_CHECKING:
    from cryptography.fernet import Fernet

KEY_BYTES = 32
# A sealed value says what it is: passwords are checked against this before anything else.
SEALED_PREFIX = "berth-sealed:v1:"
SIGNATURE_HEADER = "berth_signature"
SIGNATURE_VERSION = "v1"
# Every header Celery's task message protocol 2 defines: all of them change what runs, when, or
# where its result goes (eta, ignore_result, timelimit, retries, root_id, ...), so all are signed.
SIGNED_HEADERS = ("task", "id", "shadow", "eta", "expires", "group", "group_index", "retries", "timelimit",
                  "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin", "ignore_result",
                  "replaced_task_nesting", "stamped_headers", "stamps")


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise KeyProblem("not url-safe base64") from exc


def master_key_file() -> Path:
    return berth_home() / "master.key"


def _parse_key(text: str, where: str) -> bytes:
    try:
        key = unb64(text.strip())
    except KeyProblem as exc:
        raise KeyProblem(f"{where}: {exc}") from None
    if len(key) != KEY_BYTES:
        raise KeyProblem(f"{where}: expected {KEY_BYTES} bytes of url-safe base64, got {len(key)}")
    return key


def master_key() -> bytes:
    """The control plane's master key: BERTH_MASTER_KEY, else $BERTH_HOME/master.key (made once)."""
    env = os.environ.get("BERTH_MASTER_KEY")
    if env:
        return _parse_key(env, "BERTH_MASTER_KEY")
    path = master_key_file()
    return _load_or_create(str(path))


@functools.cache
def _load_or_create(path_text: str) -> bytes:
    return _parse_key(create_once(Path(path_text), b64(os.urandom(KEY_BYTES)) + "\n"), path_text)




def fingerprint() -> str:
    """A short, public digest of the master key: tells two keys apart, reveals nothing of them."""
    return _derive(master_key(), "fingerprint").hex()[:16]


def check_master_key(client: Any) -> None:
    """Refuse a master key other than the one the broker's instances were made with.

    The first control-plane process records the key's fingerprint on the broker; a process with
    another key (a second host without BERTH_MASTER_KEY, a lost master.key) would hand out guest
    credentials that open nothing and sign messages every guest refuses.
    """
    mine = fingerprint()
    client.set(FINGERPRINT_KEY, mine, nx=True)
    recorded = client.get(FINGERPRINT_KEY)
    recorded = recorded.decode() if isinstance(recorded, bytes) else recorded
    if recorded != mine:
        source = "BERTH_MASTER_KEY" if os.environ.get("BERTH_MASTER_KEY") else str(master_key_file())
        raise KeyProblem(f"the master key from {source} (fingerprint {mine}) is not the one this broker's "
                         f"instances were made with (fingerprint {recorded}): use the same BERTH_MASTER_KEY "
                         "on every control-plane host")


def _derive(key: bytes, *parts: str) -> bytes:
    """HMAC-SHA256 of the NUL-joined parts: ids hold no NUL, so no two part lists collide."""
    return hmac.new(key, "\0".join(parts).encode(), hashlib.sha256).digest()


def guest_key(instance_id: str, request_id: str) -> GuestKey:
    """The key of the guest of this instance, for this provisioning request."""
    return GuestKey(_derive(master_key(), "guest-key", instance_id, request_id))


def acl_password(instance_id: str, request_id: str) -> str:
    """The password of the guest's Redis ACL user."""
    return _derive(master_key(), "acl-password", instance_id, request_id).hex()


def canonical(value: Any) -> bytes:
    """One byte string per JSON value, whoever serialised it (tuples are lists, keys sorted)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


class GuestKey:
    """One guest's key: signs messages to it and seals secrets for it."""

    def __init__(self, raw: bytes) -> None:
        if len(raw) != KEY_BYTES:
            raise KeyProblem(f"a guest key is {KEY_BYTES} bytes, not {len(raw)}")
        self._sign = _derive(raw, "sign")
        self._report = _derive(raw, "report")
        self._seal_key = base64.urlsafe_b64encode(_derive(raw, "seal"))
        self.raw = raw

    @classmethod
    def from_text(cls, text: str, where: str = "BERTH_GUEST_KEY") -> GuestKey:
        return cls(_parse_key(text, where))

    def text(self) -> str:
        return b64(self.raw)

    def sign(self, *, instance_id: str, headers: Mapping[str, Any], body: Any) -> str:
        """The signature of a task message for this guest's instance: every Celery header (task
        name, id, expiry, ...; see SIGNED_HEADERS) and the whole body (args, kwargs, embed)."""
        content = canonical({"instance": instance_id, "body": body,
                             "headers": {name: headers.get(name) for name in SIGNED_HEADERS}})
        return f"{SIGNATURE_VERSION}:{hmac.new(self._sign, content, hashlib.sha256).hexdigest()}"

    def verify(self, signature: object, **fields: Any) -> bool:
        if not isinstance(signature, str):
            return False
        try:
            expected = self.sign(**fields)
        except (TypeError, ValueError):
            return False  # the body is no JSON value: nothing this key signed
        return hmac.compare_digest(signature.encode(), expected.encode())

    def report_mac(self, report: Mapping[str, Any]) -> str:
        """The guest's signature on a report it sends (a heartbeat): the control plane checks it."""
        return hmac.new(self._report, canonical(dict(report)), hashlib.sha256).hexdigest()

    def verify_report(self, report: Mapping[str, Any], mac: object) -> bool:
        if not isinstance(mac, str):
            return False
        try:
            expected = self.report_mac(report)
        except (TypeError, ValueError):
            return False
        return hmac.compare_digest(mac.encode(), expected.encode())

    @functools.cached_property
    def _fernet(self) -> Fernet:
        # OpenSSL's bindings cost a guest about 6 MiB: loaded only once it has a secret to open.
        from cryptography.fernet import Fernet

        return Fernet(self._seal_key)

    def seal(self, secret: str) -> str:
        return seal_with(self._fernet, secret)

    def unseal(self, sealed: object) -> str:
        return unseal_with(self._fernet, sealed)


def is_sealed(value: object) -> bool:
    return isinstance(value, str) and value.startswith(SEALED_PREFIX)


def seal_with(fernet: Fernet, secret: str) -> str:
    return SEALED_PREFIX + fernet.encrypt(secret.encode()).decode()


def unseal_with(fernet: Fernet, sealed: object) -> str:
    from cryptography.fernet import InvalidToken  # lazy, as in GuestKey._fernet: 6 MiB per guest

    if not is_sealed(sealed):
        raise SealError("not a sealed value")
    assert isinstance(sealed, str)
    try:
        return fernet.decrypt(sealed[len(SEALED_PREFIX):].encode()).decode()
    except (InvalidToken, UnicodeDecodeError, ValueError):
        raise SealError("not sealed with this key, or altered") from None


def _at_rest() -> Fernet:
    from cryptography.fernet import Fernet  # lazy, as in GuestKey._fernet: 6 MiB per guest

    return Fernet(base64.urlsafe_b64encode(_derive(master_key(), "at-rest")))


def seal_at_rest(secret: str) -> str:
    """Sealed with the control plane's at-rest key (for Redis and the taskmanager's queue)."""
    return seal_with(_at_rest(), secret)


def unseal_at_rest(sealed: object) -> str:
    return unseal_with(_at_rest(), sealed)
