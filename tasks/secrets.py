"""Where prepare's passwords wait between the request and the prepare message.

They are kept out of chain arguments and results, which Flower and the result backend
show, and sealed with the control plane's at-rest key (`berth.keys`): the key holds no
plaintext. It expires by itself and is dropped as soon as the instance is ACTIVE or FAILED.
"""

from __future__ import annotations

import redis

from berth.ids import secrets_key
from berth.keys import seal_at_rest, unseal_at_rest
from berth.spec import User


def sealed(users: tuple[User, ...]) -> dict[str, str]:
    """The users' passwords sealed at rest, by name: what `Records.create` keeps aside."""
    return {u.name: seal_at_rest(u.password) for u in users}


def load(client: redis.Redis, instance_id: str) -> dict[str, str]:
    return {str(k): unseal_at_rest(v) for k, v in client.hgetall(secrets_key(instance_id)).items()}


def drop(client: redis.Redis, instance_id: str) -> None:
    client.delete(secrets_key(instance_id))
