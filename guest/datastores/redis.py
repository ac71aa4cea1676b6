"""A real Redis datastore: prepare starts a redis-server for the instance and creates its users.

Each requested user becomes an ACL user with the password the requester gave, allowed only
the key namespaces ``<database>:*`` of the requested databases. The guest keeps an admin
user of its own (random password, on the guest's disk) and turns the default user off.
Every step is safe to repeat: a running server is reused, ``ACL SETUSER ... reset`` rewrites
a user from scratch, and the ACL file is saved after each prepare.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from berth.errors import DatastoreError, PrepareError
from berth.paths import replace_file
from berth.redis_server import free_port, redis_server_binary

ADMIN_USER = "berth-admin"
START_TIMEOUT_S = 10.0
# Users may do anything to their own keys, nothing to the server or other namespaces.
USER_RULES = ("resetchannels", "+@all", "-@dangerous")



def guest_address() -> str:
    """Where clients reach this guest's datastore: its own address when its boot driver gave it one
    (netns: BERTH_GUEST_ADDRESS), else loopback."""
    return os.environ.get("BERTH_GUEST_ADDRESS") or "127.0.0.1"

class RedisManager:
    name = "redis"

    def __init__(self, home: Path) -> None:
        self.dir = home / "redis"
        self.state_file = self.dir / "state.json"

    def _state(self) -> dict[str, Any]:
        """Port and admin password, chosen once per guest and kept on its disk."""
        if self.state_file.exists():
            return dict(json.loads(self.state_file.read_text()))
        self.dir.mkdir(parents=True, exist_ok=True)
        state = {"port": free_port(), "admin_password": secrets.token_urlsafe(24)}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.chmod(tmp, 0o600)
        tmp.replace(self.state_file)
        return state

    def _admin(self, state: dict[str, Any]) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=state["port"], username=ADMIN_USER,
                           password=state["admin_password"], socket_connect_timeout=1.0,
                           socket_timeout=5.0, decode_responses=True,
                           # A probe of a server that is not up yet must fail at once, not retry.
                           retry=Retry(NoBackoff(), 0))

    def _answers(self, state: dict[str, Any]) -> bool:
        try:
            return bool(self._admin(state).ping())
        except redis.RedisError:
            return False

    def _write_config(self, state: dict[str, Any], config: dict[str, Any]) -> Path:
        acl = self.dir / "users.acl"
        if not acl.exists():
            acl.write_text(f"user default off\nuser {ADMIN_USER} on >{state['admin_password']} ~* &* +@all\n")
            os.chmod(acl, 0o600)
        lines = [f"port {state['port']}", f"bind {' '.join(dict.fromkeys(['127.0.0.1', guest_address()]))}",
                 f"dir {self.dir}", f"aclfile {acl}",
                 "appendonly yes", f"logfile {self.dir / 'redis.log'}", "daemonize no",
                 f"pidfile {self.dir / 'redis.pid'}"]
        lines += [f"{key} {value}" for key, value in sorted(config.items())]
        conf = self.dir / "redis.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def _start(self, state: dict[str, Any], config: dict[str, Any] | None) -> None:
        """Start the server; with config None, with the configuration prepare wrote (restart)."""
        conf = self.dir / "redis.conf" if config is None else self._write_config(state, config)
        with open(self.dir / "server.out", "ab") as out:
            proc = subprocess.Popen([redis_server_binary(), str(conf)], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=out)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise PrepareError(f"redis-server did not start: {self._last_error()}")
            if self._answers(state):
                return
            time.sleep(0.05)
        proc.kill()
        raise PrepareError(f"redis-server did not answer within {START_TIMEOUT_S:g} s")

    def _last_error(self) -> str:
        text = ""
        for name in ("server.out", "redis.log"):
            path = self.dir / name
            if path.exists():
                text += path.read_text(errors="replace")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        fatal = [i for i, line in enumerate(lines) if "FATAL" in line]
        if fatal:
            # Redis explains a config error on the lines after its FATAL banner.
            return " ".join(lines[fatal[-1] + 1:])[:300] or lines[fatal[-1]]
        return (lines or ["no output"])[-1][:300]

    def prepare(self, users: list[dict[str, str]], databases: list[str], config: dict[str, Any]) -> dict[str, Any]:
        state = self._state()
        if not self._answers(state):
            self._start(state, config)
        admin = self._admin(state)
        patterns = [f"~{db}:*" for db in databases]
        try:
            for user in users:
                admin.execute_command("ACL", "SETUSER", user["name"], "reset", "on",
                                      f">{user['password']}", *patterns, *USER_RULES)
            admin.execute_command("ACL", "SAVE")
        except redis.RedisError as exc:
            raise PrepareError(f"creating users failed: {type(exc).__name__}") from None
        self._save_databases(sorted(set(self.databases()) | set(databases)))
        return {"datastore": self.name, "host": guest_address(), "port": state["port"],
                "users": [u["name"] for u in users], "databases": databases,
                "key_prefixes": [f"{db}:" for db in databases]}

    # --- The guest API (guest/api.py): databases are key namespaces ``<database>:*`` -----------
    # A Redis error is reported by its type only: ACL SETUSER's arguments hold a password.

    def databases(self) -> list[str]:
        if not self.state_file.exists():
            return []
        return list(self._state().get("databases", []))

    def _save_databases(self, databases: list[str]) -> None:
        replace_file(self.state_file, json.dumps({**self._state(), "databases": sorted(databases)}), mode=0o600)

    def _running(self) -> redis.Redis:
        """The admin client of a running server, or DatastoreError saying why there is none."""
        if not self.state_file.exists():
            raise DatastoreError("the redis datastore is not prepared")
        state = self._state()
        if not self._answers(state):
            raise DatastoreError("the redis datastore is down: restart it first")
        return self._admin(state)

    def restart(self) -> dict[str, Any]:
        """Stop the server if it runs, start it again with prepare's configuration."""
        if not self.state_file.exists():
            raise DatastoreError("the redis datastore is not prepared")
        self.shutdown()
        try:
            self._start(self._state(), None)
        except PrepareError as exc:
            raise DatastoreError(f"restart failed: {exc}") from None
        return self.status()

    def list_databases(self) -> list[str]:
        self._running()
        return self.databases()

    def create_database(self, name: str, *, again: bool = False) -> dict[str, Any]:
        self._running()
        existing = self.databases()
        if name in existing and not again:
            raise DatastoreError(f"database {name!r} exists")
        self._save_databases([*existing, name] if name not in existing else existing)
        return {"database": name, "key_prefix": f"{name}:"}

    def delete_database(self, name: str, *, again: bool = False) -> dict[str, Any]:
        """Remove the namespace: its keys, and every user's access to it."""
        admin = self._running()
        existing = self.databases()
        if name not in existing and not again:
            raise DatastoreError(f"no database {name!r} (databases: {', '.join(existing) or 'none'})")
        keys_removed = 0
        batch: list[str] = []
        for key in admin.scan_iter(match=f"{name}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                keys_removed += int(admin.unlink(*batch))
                batch.clear()
        if batch:
            keys_removed += int(admin.unlink(*batch))
        for user in self._user_names(admin):
            databases = [db for db in self._user_databases(admin, user) if db != name]
            admin.execute_command("ACL", "SETUSER", user, "resetkeys", *(f"~{db}:*" for db in databases))
        admin.execute_command("ACL", "SAVE")
        self._save_databases([db for db in existing if db != name])
        return {"database": name, "keys_removed": keys_removed}

    def _user_names(self, admin: redis.Redis) -> list[str]:
        return sorted(u for u in admin.execute_command("ACL", "USERS") if u not in ("default", ADMIN_USER))

    def _user_databases(self, admin: redis.Redis, user: str) -> list[str]:
        found: Any = (admin.acl_getuser(user) or {}).get("keys") or []
        patterns = found.split() if isinstance(found, str) else list(found)
        return sorted(str(p).removeprefix("~").removesuffix(":*") for p in patterns if str(p).endswith(":*"))

    def list_users(self) -> list[dict[str, Any]]:
        admin = self._running()
        return [{"name": user, "databases": self._user_databases(admin, user)} for user in self._user_names(admin)]

    def create_user(self, name: str, password: str, databases: list[str] | None, *,
                    again: bool = False) -> dict[str, Any]:
        """A user allowed the namespaces of ``databases`` (all current ones when None)."""
        admin = self._running()
        existing = self.databases()
        chosen = existing if databases is None else databases
        unknown = [db for db in chosen if db not in existing]
        if unknown:
            raise DatastoreError(f"no database {unknown[0]!r} (databases: {', '.join(existing) or 'none'})")
        if name in self._user_names(admin) and not again:
            raise DatastoreError(f"user {name!r} exists")
        try:
            admin.execute_command("ACL", "SETUSER", name, "reset", "on", f">{password}",
                                  *(f"~{db}:*" for db in chosen), *USER_RULES)
            admin.execute_command("ACL", "SAVE")
        except redis.RedisError as exc:
            raise DatastoreError(f"creating user {name!r} failed: {type(exc).__name__}") from None
        return {"name": name, "databases": sorted(chosen)}

    def delete_user(self, name: str, *, again: bool = False) -> dict[str, Any]:
        admin = self._running()
        if name not in self._user_names(admin):
            if again:
                return {"name": name, "deleted": True}
            raise DatastoreError(f"no user {name!r}")
        admin.execute_command("ACL", "DELUSER", name)
        admin.execute_command("ACL", "SAVE")
        return {"name": name, "deleted": True}

    def shutdown(self) -> dict[str, Any]:
        """Stop the server (its data stays on the guest's disk); safe to repeat."""
        if self.state_file.exists():
            state = self._state()
            try:
                self._admin(state).shutdown(nosave=True)
            except redis.RedisError:
                pass  # not running, or the connection closed as it went down
            deadline = time.monotonic() + START_TIMEOUT_S
            while self._answers(state) and time.monotonic() < deadline:
                time.sleep(0.05)
        return self.status()

    def discard(self) -> None:
        """Undo prepare completely: stop the server and remove its files."""
        self.shutdown()
        shutil.rmtree(self.dir, ignore_errors=True)

    def status(self) -> dict[str, Any]:
        if not self.state_file.exists():
            return {"datastore": self.name, "status": "not prepared"}
        state = self._state()
        return {"datastore": self.name, "port": state["port"],
                "status": "running" if self._answers(state) else "down"}
