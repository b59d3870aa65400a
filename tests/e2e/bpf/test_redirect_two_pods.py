"""Two pods of one node share that node's BPF maps: each pod's redirected connects land on
127.0.0.1:15001 inside its own netns, so two apps can hold the same client (ip, port) at the
same moment. Each accepted connection must still get its own original destination, and the
entries must be gone once the sockets close (root only)."""

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

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for netns/cgroup/BPF")

CLIENT_PORT = 41234
# joins its pod's cgroup, binds the shared client port, connects to the original destination
# (redirected to 127.0.0.1:15001), holds the connection `hold` seconds, then sends
CLIENT = textwrap.dedent(
    """
    import os, socket, sys, time
    cg, dst, port, hold = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    open(cg + "/cgroup.procs", "w").write(str(os.getpid()))
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", CLIENT_PORT)); s.settimeout(5); s.connect((dst, port))
    print("connected", flush=True); time.sleep(hold); s.sendall(b"go"); s.recv(1); s.close()
    """.replace("CLIENT_PORT", str(CLIENT_PORT))
)
# ztunnel's stand-in in the pod: asks SO_ORIGINAL_DST only once the client has sent
SERVER = textwrap.dedent(
    """
    import socket, struct
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("127.0.0.1", 15001)); l.listen(); print("ready", flush=True)
    c, peer = l.accept(); c.recv(2); raw = c.getsockopt(socket.SOL_IP, 80, 16)
    port, = struct.unpack("!H", raw[2:4])
    print(peer[1], socket.inet_ntoa(raw[4:8]), port, flush=True); c.close()
    """
)


@dataclass
class Pod:
    netns: str
    cgroup: str


@pytest.fixture
def node() -> Iterator[tuple[BpfRedirector, list[Pod]]]:
    sfx = secrets.token_hex(2)
    pins = f"/sys/fs/bpf/ambientmesh-test-{sfx}"
    r = BpfRedirector(pin_root=pins)
    pods = [
        Pod(f"am-{sfx}-p{i}", f"/sys/fs/cgroup/unified/ambientmesh-test-{sfx}-p{i}") for i in (1, 2)
    ]
    made: list[Pod] = []
    try:
        r.install()
        for p in pods:
            subprocess.run(["ip", "netns", "add", p.netns], check=True)
            os.mkdir(p.cgroup)
            made.append(p)
            subprocess.run(["ip", "-n", p.netns, "link", "set", "lo", "up"], check=True)
            r.enrol(p.cgroup, f"/run/netns/{p.netns}")
        yield r, pods
    finally:
        for p in made:
            r.unenrol(p.cgroup, f"/run/netns/{p.netns}")
            os.rmdir(p.cgroup)
            subprocess.run(["ip", "netns", "del", p.netns], check=False)
        r.uninstall()
        shutil.rmtree(pins, ignore_errors=True)


def in_netns(netns: str, code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_same_client_port_in_two_pods_keeps_each_original_destination(
    node: tuple[BpfRedirector, list[Pod]],
) -> None:
    r, (a, b) = node
    servers = [in_netns(p.netns, SERVER) for p in (a, b)]
    clients: list[subprocess.Popen[str]] = []
    try:
        for s in servers:
            assert s.stdout is not None and s.stdout.readline().strip() == "ready"
        # a connects first and holds; b connects with the same client port while a is open
        clients.append(in_netns(a.netns, CLIENT, a.cgroup, "10.77.1.1", "80", "1.0"))
        assert clients[0].stdout is not None and clients[0].stdout.readline() == "connected\n"
        clients.append(in_netns(b.netns, CLIENT, b.cgroup, "10.77.2.2", "8080", "0"))
        outs = [s.communicate(timeout=10)[0].split() for s in servers]
        for c in clients:
            assert c.wait(10) == 0, c.stderr.read() if c.stderr else ""
    finally:
        for p in (*servers, *clients):
            p.kill()
            p.wait()
    assert outs[0] == [str(CLIENT_PORT), "10.77.1.1", "80"]
    assert outs[1] == [str(CLIENT_PORT), "10.77.2.2", "8080"]
    # both sockets closed: their entries are gone, not left to fill the maps
    bpf = r._bpf
    for _ in range(50):
        if not list(bpf[b"orig_by_client"].items()) and not list(bpf[b"orig_by_cookie"].items()):
            break
        time.sleep(0.05)
    assert list(bpf[b"orig_by_client"].items()) == []
    assert list(bpf[b"orig_by_cookie"].items()) == []
