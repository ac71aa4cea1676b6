"""A private stack whose guests boot with the netns driver: a bridge of the test's own, a TLS broker
listening on loopback and on the bridge, and the driver's settings pointing at both.

Needs root (network namespaces, veth, mounts, other uids). Outside CI a test without it is skipped
with the reason; under CI (CI=true, which runs as root) it fails instead: the drills must run there.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import subprocess
from pathlib import Path

import pytest

from berth.netns import Network, missing_capabilities
from tasks.drivers import NetnsDriver
from tests.stack import Stack


def require_root() -> None:
    missing = missing_capabilities()
    if not missing:
        return
    reason = f"netns guests need root ({', '.join(missing)} missing)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: CI runs as root and must run these tests")
    pytest.skip(reason)


def free_network() -> Network:
    """A bridge name and a /24 no interface of this host uses; guests' uids from that /24's number."""
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True).stdout
    nets = [ipaddress.ip_interface(word).network for line in used.splitlines()
            for word in line.split() if "/" in word and word[0].isdigit()]
    for _ in range(200):
        third = secrets.randbelow(250) + 1
        subnet = ipaddress.ip_network(f"10.219.{third}.0/24")
        if not any(subnet.overlaps(net) for net in nets):
            return Network(bridge=f"bt{secrets.token_hex(4)}", subnet=str(subnet), uid_base=400000 + third * 256)
    raise RuntimeError("no free 10.219.x.0/24 on this host")


class NetnsStack(Stack):
    """`Stack` with TLS, a bridge of its own and guests in namespaces (`--boot netns`)."""

    def __init__(self, root: Path, *, broker: str | None = None, tls: bool = True, **env: str) -> None:
        require_root()
        self.network = free_network()
        self.network.ensure_bridge()
        try:
            super().__init__(root, broker=broker, tls=tls, bind=(self.network.gateway,),
                             env={"BERTH_NETNS_BRIDGE": self.network.bridge, "BERTH_NETNS_SUBNET": self.network.subnet,
                                  "BERTH_GUEST_UID_BASE": str(self.network.uid_base), **env})
        except BaseException:
            self.network.remove_bridge()
            raise

    def driver(self) -> NetnsDriver:
        driver = NetnsDriver(self.home)
        driver.network = lambda: self.network  # type: ignore[method-assign]
        return driver

    def provision_netns(self, instance_id: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self.provision(instance_id, "--boot", "netns", *args)

    def close(self) -> None:
        driver = self.driver()
        for home in sorted((self.home / "guests").glob("*/network.json")):
            driver.destroy(home.parent.name)
        try:
            super().close()
        finally:
            self.network.remove_bridge()
