"""Boot drivers: how a guest comes to life.

``local`` starts the guest agent as a child process on this host, the way a cloud would
boot a VM with the agent inside (an optional boot delay plays a slow VM); it stops the
guest's whole process group, datastore included. ``netns`` does the same in a network
namespace of the guest's own, as an OS user of its own (berth/netns.py, berth/sandbox.py): the
guest reaches the broker across a veth link, as a VM on another host would. ``none`` expects
someone else to start ``celery -A guest worker --instance-id ID``.

A guest gets its own broker user and its key in its environment (as Trove injects guest_info
at boot), and none of the control plane's: not the admin broker URL, not the master key.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from berth.config import cleartext_problems
from berth.errors import BootError
from berth.netns import Link, Network, exec_in, owned_by, rehost, require_privileges
from berth.paths import AGENT_LOCK, AGENT_PIDFILE, PROJECT_DIR, berth_home, guest_dir, guests_root
from tasks.celery_app import app
from tasks.runtime import broker, guest_env

log = logging.getLogger("berth.drivers")
BOOTED_BY = "booted_by"
# While a guest stops, its blocking read on the broker is ended this often (see `LocalDriver.stop`).
RELEASE_EVERY_S = 0.5
NETWORK_FILE = "network.json"
REQUEST = "request_id"
# What a guest inherits from its taskmanager's environment: the process basics and Berth's own
# settings (deadlines, ...), and nothing else: not the admin broker URL, not the master key.
INHERITED = frozenset({"PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH"})
CONTROL_PLANE_ONLY = frozenset({"BERTH_MASTER_KEY", "BERTH_FAILPOINTS", "BERTH_FAILPOINT_DIR"})


def inherited(environ: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items()
            if (k in INHERITED or k.startswith("LC_") or k.startswith("BERTH_")) and k not in CONTROL_PLANE_ONLY}
# Popen handles of guests this process started, so that their exit status is reaped.
_children: dict[str, subprocess.Popen[bytes]] = {}


class BootDriver(Protocol):
    name: str

    def boot(self, instance_id: str, delay_s: float, booted_by: str, request_id: str) -> dict[str, object]: ...

    def stop(self, instance_id: str, timeout_s: float | None = None) -> bool: ...

    def destroy(self, instance_id: str) -> bool: ...


def _stat(pid: int | str) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, ...]."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def pid_alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def group_alive(pgid: int) -> bool:
    """Whether any live process (not a zombie) is still in process group pgid."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(entry.name)
            if fields and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
                return True
    return False


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _agent_lock_held(home: Path) -> bool:
    """Whether a live guest agent holds this guest's lock (see guest.recovery)."""
    try:
        with open(home / AGENT_LOCK) as handle:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
    except BlockingIOError:
        return True
    except OSError:
        return False


def _reap() -> None:
    for instance_id, proc in list(_children.items()):
        if proc.poll() is not None:
            del _children[instance_id]


class NoneDriver:
    """The guest is started elsewhere (another host, an operator, a test)."""

    name = "none"

    def boot(self, instance_id: str, delay_s: float, booted_by: str, request_id: str) -> dict[str, object]:
        return {"driver": self.name}

    def stop(self, instance_id: str, timeout_s: float | None = None) -> bool:
        return False

    def destroy(self, instance_id: str) -> bool:
        return False


class LocalDriver:
    """The guest agent as a child process of this host, in a process group of its own."""

    name = "local"

    def __init__(self, home: Path | None = None) -> None:
        """Guests live under home/guests (default: BERTH_HOME, read when used)."""
        self.home = home

    def guest_dir(self, instance_id: str) -> Path:
        return guest_dir(instance_id, self.home)

    def recorded_pid(self, instance_id: str) -> int | None:
        """The pid the guest was started with; also its process group id."""
        try:
            return int((self.guest_dir(instance_id) / AGENT_PIDFILE).read_text())
        except (OSError, ValueError):
            return None

    def pid(self, instance_id: str) -> int | None:
        """The guest agent's pid if it is running."""
        pid = self.recorded_pid(instance_id)
        return pid if pid is not None and pid_alive(pid) else None

    def boot(self, instance_id: str, delay_s: float, booted_by: str, request_id: str) -> dict[str, object]:
        """Start the guest unless it already runs (a redelivered boot starts no second one).

        A new request gets a new machine: what an earlier provisioning of the same id left
        on this host (its datastore, its prepare journal) is removed first.
        """
        with self._boot_lock(instance_id):
            return self._boot(instance_id, delay_s, booted_by, request_id)

    @contextlib.contextmanager
    def _boot_lock(self, instance_id: str) -> Iterator[None]:
        """One boot of an instance at a time on this host (a step resumed while it also ran)."""
        folder = guests_root(self.home) / ".boot-locks"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / instance_id, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def _boot(self, instance_id: str, delay_s: float, booted_by: str, request_id: str) -> dict[str, object]:
        _reap()
        home = self.guest_dir(instance_id)
        running = self.pid(instance_id)
        owner = _read(home / REQUEST)
        if running and owner == request_id:
            return {"driver": self.name, "pid": running, "already_running": True}
        pgid = self.recorded_pid(instance_id)
        if (pgid is not None and group_alive(pgid)) or _agent_lock_held(home):
            # Never take a machine from under another provisioning: delete that one first.
            raise BootError(f"a guest of another provisioning (request {owner}) still runs for {instance_id} "
                            f"on this host (pid {pgid})")
        if home.exists():
            shutil.rmtree(home)
        home.mkdir(parents=True)
        (home / REQUEST).write_text(request_id)
        proc = self._spawn(instance_id, home, delay_s, request_id)
        (home / BOOTED_BY).write_text(booted_by)
        return {"driver": self.name, "pid": proc.pid, "already_running": False}

    def _environment(self, instance_id: str, request_id: str) -> dict[str, str]:
        env = inherited(dict(os.environ))
        env.update(BERTH_HOME=str(self.home or berth_home()),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_DIR), os.environ.get("PYTHONPATH")])),
                   **guest_env(instance_id, request_id))
        return env

    def _command(self, instance_id: str, home: Path, delay_s: float) -> list[str]:
        return [sys.executable, "-m", "guest.launch", "--instance-id", instance_id, "--boot-delay", f"{delay_s:g}"]

    def _machine(self, instance_id: str, home: Path, env: dict[str, str], command: list[str]) -> list[str]:
        """Set up what the guest runs in; the command that starts it there (here: as it is)."""
        return command

    def _spawn(self, instance_id: str, home: Path, delay_s: float, request_id: str) -> subprocess.Popen[bytes]:
        env = self._environment(instance_id, request_id)
        command = self._machine(instance_id, home, env, self._command(instance_id, home, delay_s))
        with open(home / "agent.log", "ab") as log:
            proc = subprocess.Popen(command, cwd=PROJECT_DIR, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=log, start_new_session=True)
        (home / AGENT_PIDFILE).write_text(str(proc.pid))
        _children[instance_id] = proc
        return proc

    def stop(self, instance_id: str, timeout_s: float | None = None) -> bool:
        """SIGTERM the guest's process group, SIGKILL what is left after timeout_s.

        timeout_s defaults to the berth_guest_stop_timeout_s setting.

        The whole group goes, so a datastore left behind by a crashed agent goes too.
        """
        return bool(self._stop_many([instance_id], timeout_s))

    def _stop_many(self, instance_ids: list[str], timeout_s: float | None) -> list[str]:
        """`stop` for several guests at once: all are asked, then all are waited for, together."""
        groups = {}
        for instance_id in instance_ids:
            pid = self.recorded_pid(instance_id)
            if pid is None or not group_alive(pid):
                (self.guest_dir(instance_id) / AGENT_PIDFILE).unlink(missing_ok=True)
            else:
                groups[instance_id] = pid
                _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + (_stop_timeout_s() if timeout_s is None else timeout_s)
        released_at = 0.0
        while any(group_alive(pid) for pid in groups.values()) and time.monotonic() < deadline:
            if time.monotonic() - released_at > RELEASE_EVERY_S:
                for instance_id, pid in groups.items():
                    if group_alive(pid):
                        _release_waits(instance_id)
                released_at = time.monotonic()
            _reap()
            time.sleep(0.05)
        for instance_id, pid in groups.items():
            _signal_group(pid, signal.SIGKILL)
            (self.guest_dir(instance_id) / AGENT_PIDFILE).unlink(missing_ok=True)
        _reap()
        return list(groups)

    def destroy(self, instance_id: str) -> bool:
        """Stop the guest and remove its disk, as deleting a VM would; True if it was running."""
        stopped = self.stop(instance_id)
        shutil.rmtree(self.guest_dir(instance_id), ignore_errors=True)
        (guests_root(self.home) / ".boot-locks" / instance_id).unlink(missing_ok=True)
        return stopped

    def restart(self, instance_id: str) -> int:
        """Start the agent again on the same disk, as a rebooted VM would (a drill after a crash)."""
        home = self.guest_dir(instance_id)
        if self.pid(instance_id) is not None:
            raise BootError(f"the guest of {instance_id} still runs")
        request_id = _read(home / REQUEST)
        if not request_id:
            raise BootError(f"the disk of {instance_id} names no provisioning request: boot it instead")
        proc = self._spawn(instance_id, home, 0.0, request_id)
        return proc.pid

    def stop_all(self, booted_by: str | None = None, timeout_s: float | None = None) -> list[str]:
        """Stop every local guest (or only those booted by one taskmanager node)."""
        homes = [pidfile.parent for pidfile in sorted(guests_root(self.home).glob(f"*/{AGENT_PIDFILE}"))]
        return self._stop_many([home.name for home in homes
                                if booted_by is None or _read(home / BOOTED_BY) == booted_by], timeout_s)


class NetnsDriver(LocalDriver):
    """The guest agent in a network namespace of its own, as an OS user of its own.

    Boot gives the instance a namespace, a veth on the bridge and an address (berth/netns.py),
    hands the guest its disk (mode 0700, its own uid), and starts the agent through
    berth/sandbox.py, which shows it only the interpreter, the project and that disk. The guest's
    broker URLs name the bridge's address instead of loopback; off loopback they must be TLS
    (berth.config refuses clear text unless BERTH_ALLOW_CLEARTEXT). Delete removes the link.
    """

    name = "netns"

    def network(self) -> Network:
        return Network(bridge=str(app.conf.berth_netns_bridge), subnet=str(app.conf.berth_netns_subnet),
                       uid_base=int(app.conf.berth_guest_uid_base))

    def allocations(self) -> Path:
        return guests_root(self.home) / ".netns"

    def boot(self, instance_id: str, delay_s: float, booted_by: str, request_id: str) -> dict[str, object]:
        require_privileges()
        result = super().boot(instance_id, delay_s, booted_by, request_id)
        link = self.link(instance_id)
        return {**result, "address": link.address if link else None}

    def linked(self) -> list[str]:
        """Instances of this host whose guests were given a link."""
        return sorted(path.parent.name for path in guests_root(self.home).glob(f"*/{NETWORK_FILE}"))

    def link(self, instance_id: str) -> Link | None:
        try:
            return Link(**json.loads((self.guest_dir(instance_id) / NETWORK_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _environment(self, instance_id: str, request_id: str) -> dict[str, str]:
        """The guest's environment, its URLs at the bridge's address; refused (before any link
        exists) when they would cross the link in clear text."""
        env = super()._environment(instance_id, request_id)
        gateway = self.network().gateway
        for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
            env[name] = rehost(env[name], gateway)
        problems = cleartext_problems({"broker_url": env["CELERY_BROKER_URL"],
                                       "result_backend": env["CELERY_RESULT_BACKEND"],
                                       "berth_allow_cleartext": app.conf.berth_allow_cleartext})
        if problems:
            raise BootError(f"the guest of {instance_id} would reach the broker at {gateway}: {problems[0]}")
        env["HOME"] = str(self.guest_dir(instance_id))
        for name in ("USER", "LOGNAME"):
            env.pop(name, None)
        return env

    def _machine(self, instance_id: str, home: Path, env: dict[str, str], command: list[str]) -> list[str]:
        """The guest's link and address, its disk given to its user; the command run inside."""
        link = self.network().attach(instance_id, self.allocations())
        env["BERTH_GUEST_ADDRESS"] = link.address
        (home / NETWORK_FILE).write_text(link.to_json())
        (home / AGENT_PIDFILE).touch()  # the guest's to write first, ours to write after the start
        owned_by(home, link.uid)
        (home / NETWORK_FILE).chmod(0o644)
        return self.inside(link, home, command)

    @staticmethod
    def inside(link: Link, home: Path, command: list[str]) -> list[str]:
        """``command`` as the guest runs: in its namespace, as its user, seeing what it may see."""
        sandbox = [sys.executable, "-m", "berth.sandbox", "--uid", str(link.uid), "--gid", str(link.uid),
                   *(arg for path in (sys.executable, sys.base_prefix, sys.prefix, PROJECT_DIR, home)
                     for arg in ("--expose", str(path))),
                   *(arg for path in (home.parent.parent, home.parent) for arg in ("--hide", str(path))), "--"]
        return exec_in(link.netns, [*sandbox, *command])

    def destroy(self, instance_id: str) -> bool:
        stopped = super().destroy(instance_id)
        self.network().detach(instance_id, self.allocations())
        return stopped


def _release_waits(instance_id: str) -> None:
    """A stopping agent closes once its blocking read returns: end that read now (berth/brokers)."""
    try:
        broker().release_waits(instance_id)
    except Exception as exc:  # noqa: BLE001 - a broker away only makes the stop wait out the read
        log.debug("could not release the waits of %s: %s", instance_id, exc)


def _stop_timeout_s() -> float:
    return float(app.conf.berth_guest_stop_timeout_s)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


DRIVERS: dict[str, BootDriver] = {"local": LocalDriver(), "netns": NetnsDriver(), "none": NoneDriver()}
