"""Two pods of one node share that node's BPF maps: each pod's redirected connects land on
127.0.0.1:15001 inside its own netns, so two apps can hold the same client (ip, port) at the
same moment. Each accepted connection must still get its own original destination, with the
sk_msg fast path each pod's bytes must reach its own pod's proxy socket and back, and the
entries must be gone once the sockets close (root only).

The proxy's stand-in runs in a cgroup of its own, as ztunnel does (getsockopt and the passive
sockops are attached there, never on the machine's root cgroup)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from bpf.loader import BpfRedirector
from ztunnel.inpod.capture import add_inbound_capture, remove_inbound_capture

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for netns/cgroup/BPF")

CLIENT_PORT = 41234
# joins its pod's cgroup, binds the shared client port, connects to the original destination
# (redirected to 127.0.0.1:15001), holds the connection `hold` seconds, then sends its name and
# prints the proxy's answer
CLIENT = textwrap.dedent(
    """
    import os, socket, sys, time
    cg, dst, port, hold = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    open(cg + "/cgroup.procs", "w").write(str(os.getpid()))
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", CLIENT_PORT)); s.settimeout(5); s.connect((dst, port))
    print("connected", flush=True); time.sleep(hold)
    s.sendall(os.path.basename(cg).encode()); print(s.recv(64).decode(), flush=True); s.close()
    """.replace("CLIENT_PORT", str(CLIENT_PORT))
)
# ztunnel's stand-in in the pod (in the proxy cgroup): asks SO_ORIGINAL_DST only once the
# client has sent, answers with its own pod's name, and reports how many bytes came through
# TCP (tcp_info.tcpi_bytes_received, offset 128): none when sk_msg moved them socket to socket
SERVER = textwrap.dedent(
    """
    import os, socket, struct, sys
    open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("127.0.0.1", 15001)); l.listen(); print("ready", flush=True)
    c, peer = l.accept(); got = c.recv(64).decode(); raw = c.getsockopt(socket.SOL_IP, 80, 16)
    port, = struct.unpack("!H", raw[2:4])
    tcp_rx, = struct.unpack("Q", c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)[128:136])
    c.sendall(b"proxy-" + sys.argv[2].encode())  # only now may the client close (FIN counts)
    print(peer[1], socket.inet_ntoa(raw[4:8]), port, got, tcp_rx, flush=True)
    c.recv(1); c.close()
    """
)


@dataclass
class Pod:
    netns: str
    cgroup: str


@dataclass
class Node:
    bpf: BpfRedirector
    proxy_cgroup: str
    pods: list[Pod]


@pytest.fixture(params=[False, True], ids=["plain", "fastpath"])
def node(request: pytest.FixtureRequest) -> Iterator[Node]:
    sfx = secrets.token_hex(2)
    pins = f"/sys/fs/bpf/ambientmesh-test-{sfx}"
    root = f"/sys/fs/cgroup/unified/ambientmesh-test-{sfx}"
    proxy_cg = f"{root}/ztunnel"
    os.mkdir(root)
    os.mkdir(proxy_cg)
    r = BpfRedirector(pin_root=pins, fastpath=request.param, ztunnel_cgroup=proxy_cg)
    pods = [Pod(f"am-{sfx}-p{i}", f"{root}/p{i}") for i in (1, 2)]
    made: list[Pod] = []
    try:
        r.install()
        for p in pods:
            subprocess.run(["ip", "netns", "add", p.netns], check=True)
            os.mkdir(p.cgroup)
            made.append(p)
            subprocess.run(["ip", "-n", p.netns, "link", "set", "lo", "up"], check=True)
            r.enrol(p.cgroup)  # as ztunnel.inpod.redirect wires a pod
            add_inbound_capture(f"/run/netns/{p.netns}")
        yield Node(r, proxy_cg, pods)
    finally:
        for p in made:
            r.unenrol(p.cgroup)
            remove_inbound_capture(f"/run/netns/{p.netns}")
            os.rmdir(p.cgroup)
            subprocess.run(["ip", "netns", "del", p.netns], check=False)
        r.uninstall()
        shutil.rmtree(pins, ignore_errors=True)
        os.rmdir(proxy_cg)
        os.rmdir(root)


def in_netns(netns: str, code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_same_client_port_in_two_pods_keeps_each_original_destination(node: Node) -> None:
    r, (a, b) = node.bpf, node.pods
    servers = [in_netns(p.netns, SERVER, node.proxy_cgroup, name) for p, name in
               ((a, "p1"), (b, "p2"))]  # fmt: skip
    clients: list[subprocess.Popen[str]] = []
    try:
        for s in servers:
            assert s.stdout is not None and s.stdout.readline().strip() == "ready"
        # a connects first and holds; b connects with the same client port while a is open
        clients.append(in_netns(a.netns, CLIENT, a.cgroup, "10.77.1.1", "80", "1.0"))
        assert clients[0].stdout is not None and clients[0].stdout.readline() == "connected\n"
        clients.append(in_netns(b.netns, CLIENT, b.cgroup, "10.77.2.2", "8080", "0"))
        replies = [c.communicate(timeout=10) for c in clients]
        for c, (_, err) in zip(clients, replies, strict=True):
            assert c.returncode == 0, err
        outs = [s.communicate(timeout=10)[0].split() for s in servers]
    finally:
        for p in (*servers, *clients):
            p.kill()
            p.wait()
    # each pod's proxy got its own app's destination and bytes, and answered its own app; with
    # the fast path, both pods' bytes skipped TCP (a key shared across pods evicts one pod's
    # sockets from the sockhash: no crossing, but that pod silently loses the fast path)
    tcp_rx = "0" if node.bpf.fastpath else "2"
    assert outs[0] == [str(CLIENT_PORT), "10.77.1.1", "80", "p1", tcp_rx]
    assert outs[1] == [str(CLIENT_PORT), "10.77.2.2", "8080", "p2", tcp_rx]
    assert [out.split()[-1] for out, _ in replies] == ["proxy-p1", "proxy-p2"]
    # both sockets closed: their entries are gone, not left to fill the maps
    bpf = r._bpf
    for _ in range(50):
        if not list(bpf[b"orig_by_client"].items()) and not list(bpf[b"orig_by_cookie"].items()):
            break
        time.sleep(0.05)
    assert list(bpf[b"orig_by_client"].items()) == []
    assert list(bpf[b"orig_by_cookie"].items()) == []
