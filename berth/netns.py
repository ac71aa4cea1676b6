"""Guests' own networks: a network namespace per guest, joined to the host by a veth pair on a bridge.

The host side is one bridge (``berth0`` by default) holding the subnet's first address, the
gateway: the broker listens there (and on loopback), and nowhere else a guest could reach. Each
guest's namespace has ``lo`` and ``eth0`` with an address of its own in the subnet, and no route
beyond it: a guest reaches the broker and nothing else of the host.

    ip netns add <bridge>-<id>            the guest's namespace
    ip link add v<hash> type veth peer    the link: host end on the bridge, guest end as eth0

Everything here needs CAP_NET_ADMIN (root, in practice); `missing_capabilities` names what
this process lacks. `cut` and `heal` take a guest's link down and up again: a partition.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from berth.errors import BootError
from berth.tls import is_loopback

# Capabilities the netns driver uses, by bit number (linux/capability.h).
CAPABILITIES = {"CAP_CHOWN": 0, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21}
WHY = {"CAP_CHOWN": "give the guest its disk", "CAP_SETGID": "run the guest as its own group",
       "CAP_SETUID": "run the guest as its own user", "CAP_NET_ADMIN": "make namespaces, veth pairs and the bridge",
       "CAP_SYS_ADMIN": "enter namespaces and mount the guest's view of the files"}
NETNS_DIR = Path("/run/netns")
DEFAULT_BRIDGE = "berth0"
DEFAULT_SUBNET = "10.213.0.0/16"
DEFAULT_UID_BASE = 200000


def missing_capabilities() -> list[str]:
    """The capabilities of CAPABILITIES this process lacks (all of them when it cannot tell)."""
    try:
        status = Path("/proc/self/status").read_text()
        effective = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16)
    except (OSError, StopIteration, ValueError):
        return list(CAPABILITIES)
    return [name for name, bit in CAPABILITIES.items() if not effective >> bit & 1]


def require_privileges() -> None:
    """Raise BootError naming what is missing when this process cannot run netns guests."""
    missing = missing_capabilities()
    if missing:
        raise BootError("the netns boot driver needs " + "; ".join(f"{name} (to {WHY[name]})" for name in missing)
                        + ": run the taskmanager as root, or use the local driver")
    if shutil.which("ip") is None:
        raise BootError("the netns boot driver needs the `ip` command (Debian's iproute2)")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise BootError(f"`ip {' '.join(args)}` failed: {out.stderr.strip() or out.stdout.strip()}")
    return out


@dataclass(frozen=True)
class Link:
    """One guest's network: its namespace, the host end of its veth, its address and its OS user."""

    instance_id: str
    netns: str
    host_veth: str
    address: str
    uid: int

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


@dataclass(frozen=True)
class Network:
    """The bridge guests hang off, its subnet, and the OS users guests run as (uid_base + host index)."""

    bridge: str = DEFAULT_BRIDGE
    subnet: str = DEFAULT_SUBNET
    uid_base: int = DEFAULT_UID_BASE

    @classmethod
    def from_env(cls) -> Network:
        """The network celeryconfig describes (BERTH_NETNS_BRIDGE, BERTH_NETNS_SUBNET, BERTH_GUEST_UID_BASE)."""
        return cls(os.environ.get("BERTH_NETNS_BRIDGE") or DEFAULT_BRIDGE,
                   os.environ.get("BERTH_NETNS_SUBNET") or DEFAULT_SUBNET,
                   int(os.environ.get("BERTH_GUEST_UID_BASE") or DEFAULT_UID_BASE))

    def __post_init__(self) -> None:
        if not 1 <= len(self.bridge) <= 15 or not self.bridge.replace("-", "").isalnum():
            raise ValueError(f"bridge name {self.bridge!r}: 1 to 15 letters, digits or '-'")
        net = ipaddress.ip_network(self.subnet)
        if net.version != 4 or net.num_addresses < 4:
            raise ValueError(f"subnet {self.subnet!r}: an IPv4 network of at least 4 addresses")

    @property
    def gateway(self) -> str:
        """The host's address on the bridge: where guests reach the broker."""
        return str(ipaddress.ip_network(self.subnet)[1])

    @property
    def prefix(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen

    def ensure_bridge(self) -> None:
        """Create the bridge with the gateway address (idempotent)."""
        require_privileges()
        if ip("link", "show", self.bridge, check=False).returncode != 0:
            ip("link", "add", self.bridge, "type", "bridge", check=False)
        addresses = ip("-o", "-4", "addr", "show", "dev", self.bridge).stdout
        if f" {self.gateway}/" not in addresses:
            ip("addr", "add", f"{self.gateway}/{self.prefix}", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def remove_bridge(self) -> None:
        ip("link", "del", self.bridge, check=False)

    # --- One guest's link -----------------------------------------------------------------------

    def names(self, instance_id: str) -> tuple[str, str]:
        """(namespace, host veth) of an instance; a veth name holds at most 15 characters."""
        digest = hashlib.sha256(f"{self.bridge}/{instance_id}".encode()).hexdigest()[:12]
        return f"{self.bridge}-{instance_id}", f"v{digest}"

    def attach(self, instance_id: str, allocations: Path) -> Link:
        """Give the instance a namespace, a veth on the bridge and an address (again after a crash:
        whatever an earlier attach left is replaced)."""
        self.ensure_bridge()
        self.detach(instance_id)
        netns, host_veth = self.names(instance_id)
        index = self._allocate(instance_id, allocations)
        address = str(ipaddress.ip_network(self.subnet)[index])
        peer = "p" + host_veth[1:]
        ip("netns", "add", netns)
        ip("link", "add", host_veth, "type", "veth", "peer", "name", peer)
        ip("link", "set", peer, "netns", netns)
        ip("link", "set", host_veth, "master", self.bridge, "up")
        ip("-n", netns, "link", "set", peer, "name", "eth0")
        ip("-n", netns, "addr", "add", f"{address}/{self.prefix}", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        ip("-n", netns, "link", "set", "lo", "up")
        return Link(instance_id, netns, host_veth, address, self.uid_base + index)

    def detach(self, instance_id: str, allocations: Path | None = None) -> None:
        """Remove the instance's namespace and veth (idempotent); free its address with ``allocations``."""
        netns, host_veth = self.names(instance_id)
        ip("link", "del", host_veth, check=False)
        if (NETNS_DIR / netns).exists():
            ip("netns", "del", netns, check=False)
        if allocations is not None:
            (allocations / instance_id).unlink(missing_ok=True)

    def cut(self, instance_id: str) -> None:
        """A partition: the guest's link goes down (its connections stay open, and stall)."""
        ip("link", "set", self.names(instance_id)[1], "down")

    def heal(self, instance_id: str) -> None:
        ip("link", "set", self.names(instance_id)[1], "up")

    def _allocate(self, instance_id: str, allocations: Path) -> int:
        """The lowest free host index (2 and up: 1 is the gateway), kept in ``allocations``/ID."""
        allocations.mkdir(parents=True, exist_ok=True)
        size = ipaddress.ip_network(self.subnet).num_addresses
        with open(allocations / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            taken = {}
            for entry in allocations.iterdir():
                if not entry.name.startswith("."):
                    try:
                        taken[int(entry.read_text())] = entry.name
                    except (OSError, ValueError):
                        continue
            mine = next((index for index, owner in taken.items() if owner == instance_id), None)
            if mine is None:
                mine = next((i for i in range(2, size - 1) if i not in taken), None)
                if mine is None:
                    raise BootError(f"no free address left in {self.subnet} for {instance_id}")
                (allocations / instance_id).write_text(str(mine))
            return mine


def rehost(url: str, host: str) -> str:
    """``url`` (or each URL of a ``;`` list) with a loopback host replaced by ``host``."""
    parts = []
    for part in url.split(";"):
        split = urlsplit(part)
        if split.hostname and is_loopback(split.hostname):
            userinfo, _, hostport = split.netloc.rpartition("@")
            port = f":{split.port}" if split.port else ""
            netloc = f"{userinfo}@{host}{port}" if userinfo else f"{host}{port}"
            part = urlunsplit((split.scheme, netloc, split.path, split.query, split.fragment))
        parts.append(part)
    return ";".join(parts)


def exec_in(netns: str, command: list[str]) -> list[str]:
    """``command`` run inside ``netns`` (ip execs it: the pid stays the command's)."""
    return ["ip", "netns", "exec", netns, *command]


def owned_by(path: Path, uid: int) -> None:
    """Give ``path`` and everything under it to ``uid`` (group uid too), private to it."""
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            os.lchown(os.path.join(root, name), uid, uid)
    os.chown(path, uid, uid)
    os.chmod(path, 0o700)
