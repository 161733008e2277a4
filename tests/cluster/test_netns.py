"""`cluster/netns.py` on its own: a bridge and a node namespace made for real, a TCP server on the
bridge reached from inside the namespace, then the namespace's links cut (`cut_own_links`, run in
it) and restored. Needs root: skipped elsewhere, with the reason."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pytest

from cluster import netns

pytestmark = pytest.mark.skipif(netns.unavailable() is not None, reason=str(netns.unavailable()))

# run inside the namespace: connect to the bridge's server, say how it went (connected / the error)
CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("connected")
except OSError as exc:
    print(type(exc).__name__)
"""
# run inside the namespace: cut its links for a while, connecting meanwhile
CUT_AND_CONNECT = """
import socket, sys, threading, time
from cluster.netns import cut_own_links, in_own_namespace
assert in_own_namespace()
cut = threading.Thread(target=cut_own_links, args=(2.0,))
cut.start()
time.sleep(0.3)
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.0).close()
    print("connected while cut")
except OSError as exc:
    print("cut:", type(exc).__name__)
cut.join()
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5.0).close()
print("connected after")
"""


@pytest.fixture
def node():
    bridge = netns.Bridge()
    net = netns.NodeNet(bridge.cluster, 0)
    try:
        net.create(bridge.name)
        yield bridge, net
    finally:
        net.delete()
        bridge.delete()
    assert net.namespace not in netns.namespaces()


@pytest.fixture
def server(node):
    bridge, _ = node
    listener = socket.create_server((bridge.address, 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()
    listener.close()
    for conn in accepted:
        conn.close()


def in_namespace(net: netns.NodeNet, code: str, *args: object) -> str:
    done = subprocess.run(net.command([sys.executable, "-c", code, *map(str, args)]), capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_this_process_is_not_in_a_node_namespace():
    # the guard of `cut_own_links`: true here, it would cut this machine's own links
    assert not netns.in_own_namespace()


def test_a_node_namespace_reaches_the_bridge_until_its_links_are_cut(node, server):
    bridge, net = node
    assert netns.namespace_of(net.address) == net.namespace
    assert netns.namespace_of(bridge.address) is None  # the head's side: this machine's namespace
    host, port = server
    assert in_namespace(net, CONNECT, host, port, 5.0).strip() == "connected"
    out = in_namespace(net, CUT_AND_CONNECT, host, port).splitlines()
    assert out[0].startswith("cut: ") and out[1] == "connected after", out
    # no link of the namespace left down
    links = [line for line in netns.ip("-o", "link", "show", netns=net.namespace).splitlines() if ": lo:" not in line]
    assert links and all("state UP" in line for line in links), links
