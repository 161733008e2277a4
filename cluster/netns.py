"""Worker nodes in network namespaces of their own: a local cluster whose links can really be cut.

`ringpipe serve --nodes N --netns` (Linux, root, iproute2) builds one on this
machine. Cluster K (the first free number) gets a bridge `rpK-br` with the
address 10.231.K.1/24, where the head and this process live; worker node I runs
in the namespace `ringpipe-K-node-I`, joined to the bridge by a veth pair
(`rpK-I-h` here, `rpK-I-n` inside) with the address 10.231.K.(10+I). Every
packet between nodes crosses the bridge, and the bridge has no uplink: nothing
leaves the machine.

A partition (`cut_own_links`, which `cluster.node_fault partition` runs inside
the node) sets the node's links down: packets to and from it are dropped, its
processes run on as zombies, and its TCP connections stall as they do behind a
cut cable, until the links are set up again.

Everything here raises `NetnsError` (what failed, and `ip`'s own words).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

SUBNET = "10.231"  # 10.231.K.0/24 is cluster K's
NAMESPACE_PREFIX = "ringpipe-"
FIRST_HOST = 10  # node I's address ends in FIRST_HOST + I


class NetnsError(RuntimeError):
    pass


def unavailable() -> str | None:
    """Why nodes cannot have namespaces here (None: they can)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2's `ip` command"
    return None


def ip(*args: str, netns: str | None = None) -> str:
    """Run `ip [-n NETNS] ARGS…`; its stdout, or NetnsError with its stderr."""
    cmd = ["ip", *(("-n", netns) if netns else ()), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise NetnsError(f"`{' '.join(cmd)}` failed: {done.stderr.strip() or done.returncode}")
    return done.stdout


def is_netns_address(address: str) -> bool:
    """An address of a cluster built here (the head's, or a node's)."""
    return address.startswith(SUBNET + ".")


def namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.startswith(NAMESPACE_PREFIX)]


def namespace_of(address: str) -> str | None:
    """The namespace on this machine that holds `address`, or None."""
    if not is_netns_address(address) or unavailable():
        return None
    for name in namespaces():
        try:
            if f" {address}/" in ip("-o", "-4", "addr", "show", netns=name):
                return name
        except NetnsError:
            continue  # deleted meanwhile
    return None


def in_own_namespace() -> bool:
    """This process runs in a named network namespace (`ip netns add`), not the machine's own."""
    try:
        return bool(ip("netns", "identify", str(os.getpid())).strip())
    except NetnsError:
        return False


def own_links() -> list[str]:
    """The links of this process's namespace, loopback aside."""
    names = []
    for line in ip("-o", "link", "show").splitlines():
        name = line.split(":", 2)[1].strip().split("@", 1)[0]
        if name != "lo":
            names.append(name)
    return names


def cut_own_links(seconds: float) -> None:
    """A partition of the node this process runs on: its links down for `seconds`, then up again.

    Refuses in the machine's own namespace (that would cut the machine off, not a node)."""
    if not in_own_namespace():
        raise NetnsError("this node shares the machine's network namespace: cutting its links would cut "
                         "off the machine (start nodes with `ringpipe serve --nodes N --netns`, or on a real "
                         "cluster drop the node's traffic with firewall rules, see README)")
    links = own_links()
    if not links:
        raise NetnsError("this node's namespace has no link to cut")
    for name in links:
        ip("link", "set", name, "down")
    try:
        time.sleep(seconds)
    finally:
        for name in links:
            ip("link", "set", name, "up")


@dataclass
class NodeNet:
    """One worker node's namespace and its veth pair to the bridge."""

    cluster: int
    index: int
    namespace: str = field(init=False)
    address: str = field(init=False)

    def __post_init__(self) -> None:
        self.namespace = f"{NAMESPACE_PREFIX}{self.cluster}-node-{self.index}"
        self.address = f"{SUBNET}.{self.cluster}.{FIRST_HOST + self.index}"
        self._host, self._inner = f"rp{self.cluster}-{self.index}-h", f"rp{self.cluster}-{self.index}-n"

    def create(self, bridge: str) -> None:
        self.delete()  # a namespace left by a run that died
        ip("netns", "add", self.namespace)
        ip("link", "add", self._host, "type", "veth", "peer", "name", self._inner)
        ip("link", "set", self._inner, "netns", self.namespace)
        ip("link", "set", self._host, "master", bridge)
        ip("link", "set", self._host, "up")
        ip("addr", "add", f"{self.address}/24", "dev", self._inner, netns=self.namespace)
        ip("link", "set", self._inner, "up", netns=self.namespace)
        ip("link", "set", "lo", "up", netns=self.namespace)

    def command(self, argv: list[str]) -> list[str]:
        """`argv`, run inside this node's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def delete(self) -> None:
        """Kill what still runs in the namespace, then remove it and its link (if they exist)."""
        if self.namespace in namespaces():
            for pid in ip("netns", "pids", self.namespace).split():
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass
            ip("netns", "delete", self.namespace)
        try:
            ip("link", "delete", self._host)
        except NetnsError:
            pass  # gone with the namespace (a veth pair dies with either end)


class Bridge:
    """Cluster K's bridge: the first K in 0-254 whose bridge does not exist yet."""

    def __init__(self) -> None:
        taken = {line.split(":", 2)[1].strip() for line in ip("-o", "link", "show").splitlines()}
        for k in (k for k in range(255) if f"rp{k}-br" not in taken):
            try:
                ip("link", "add", f"rp{k}-br", "type", "bridge")
                break
            except NetnsError:
                continue  # another cluster took it meanwhile
        else:
            raise NetnsError("no free ringpipe bridge name: delete stale ones (`ip link delete rpK-br`)")
        self.cluster, self.name, self.address = k, f"rp{k}-br", f"{SUBNET}.{k}.1"
        try:
            ip("addr", "add", f"{self.address}/24", "dev", self.name)
            ip("link", "set", self.name, "up")
        except NetnsError:
            self.delete()
            raise

    def delete(self) -> None:
        try:
            ip("link", "delete", self.name)
        except NetnsError:
            pass
