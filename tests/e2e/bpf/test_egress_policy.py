"""Egress policy and kernel-side drops at connect(), on real netns, cgroups and BPF (root).

The pod (its own netns, a veth to a peer netns holding the "remote" server, its own cgroup
with the redirect programs) runs a client; a stand-in for ztunnel, in a cgroup of its own and
inside the pod's netns like ztunnel's in-pod listener, forwards each redirected connection
to its SO_ORIGINAL_DST. Policies come from a snapshot, compiled by bpf.policy into the pinned
maps exactly as ztunnel does. A denied connect must fail with EPERM at once and put nothing
on the pod's veth; a pod whose ztunnel is gone must get EPERM too, counted and recorded as an
event that a reader started later still finds."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from bpf.events import DropReader
from bpf.loader import BpfRedirector
from bpf.policy import PodEgress, PolicyMaps, compile_egress, policy_id
from mesh.config.parse import parse_objects
from mesh.config.snapshot import Snapshot
from mesh.netns import NetNs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for netns/cgroup/BPF")

POD_IP, PEER_IP = "10.79.0.2", "10.79.0.1"
SO_NETNS_COOKIE = 71

# joins the pod's cgroup, connects, prints "eperm <ms>", "refused", or the server's answer
CLIENT = textwrap.dedent(
    """
    import os, socket, sys, time
    open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
    s = socket.socket(); s.settimeout(5)
    t = time.perf_counter()
    try:
        s.connect((sys.argv[2], int(sys.argv[3])))
    except PermissionError:
        print("eperm", (time.perf_counter() - t) * 1000); sys.exit(0)
    except ConnectionRefusedError:
        print("refused"); sys.exit(0)
    if len(sys.argv) > 4:  # connect() only: what connect4 decided
        print("connected"); sys.exit(0)
    s.sendall(b"ping"); print(s.recv(64).decode())
    """
)
# ztunnel's stand-in: in its own cgroup (no connect4 there), in the pod's netns
FORWARDER = textwrap.dedent(
    """
    import os, socket, struct, sys, threading
    open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("127.0.0.1", 15001)); l.listen(); print("ready", flush=True)
    def pipe(a, b):
        try:
            while d := a.recv(4096): b.sendall(d)
        except OSError: pass
        for s in (a, b):
            try: s.shutdown(socket.SHUT_RDWR)
            except OSError: pass
    while True:
        c, _ = l.accept()
        try:  # a connect-only client may be gone already: its original dst with it
            raw = c.getsockopt(socket.SOL_IP, 80, 16)
            port, = struct.unpack("!H", raw[2:4])
            u = socket.create_connection((socket.inet_ntoa(raw[4:8]), port), timeout=2)
        except (OSError, struct.error):
            c.close(); continue
        threading.Thread(target=pipe, args=(c, u), daemon=True).start()
        threading.Thread(target=pipe, args=(u, c), daemon=True).start()
    """
)
SERVER = textwrap.dedent(
    """
    import socket, threading
    l = socket.create_server(("0.0.0.0", 80)); print("ready", flush=True)
    def serve(c):
        while d := c.recv(64): c.sendall(b"pong:" + d)
    while True:
        c, _ = l.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
    """
)


VIP = "10.96.79.10"


def _vip_docs(allow_port: int) -> list[dict[str, Any]]:
    """A Service (VIP:80 -> port 80 of pod `peer`) and a policy allowing the app only to pods
    labelled app=peer on `allow_port`."""
    docs = _docs([])[:2]
    docs += [
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "peer", "namespace": "shop",
         "labels": {"app": "peer"}}, "spec": {"nodeName": "node1"}, "status": {"podIP": PEER_IP}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "peer", "namespace": "shop"},
         "spec": {"clusterIP": VIP, "selector": {"app": "peer"},
                  "ports": [{"port": 80, "targetPort": 80}]}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": {"name": "app-out", "namespace": "shop"},
         "spec": {"podSelector": {"matchLabels": {"app": "app"}}, "policyTypes": ["Egress"],
                  "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "peer"}}}],
                              "ports": [{"port": allow_port}]}]}},
    ]  # fmt: skip
    return docs


def _docs(ports: list[int]) -> list[dict[str, Any]]:
    return [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "app", "namespace": "shop",
         "labels": {"app": "app"}}, "spec": {"nodeName": "node1"}, "status": {"podIP": POD_IP}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": {"name": "app-out", "namespace": "shop"},
         "spec": {"podSelector": {"matchLabels": {"app": "app"}}, "policyTypes": ["Egress"],
                  "egress": [{"to": [{"ipBlock": {"cidr": f"{PEER_IP}/32"}}],
                              "ports": [{"port": p} for p in ports]}]}},
    ]  # fmt: skip


@dataclass
class Pod:
    ns: str
    cg: str
    proxy_cg: str
    veth: str
    redirector: BpfRedirector
    cookie: int
    maps: PolicyMaps

    def tx(self) -> int:
        out = subprocess.run(
            ["ip", "netns", "exec", self.ns, "cat",
             f"/sys/class/net/{self.veth}/statistics/tx_packets"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return int(out.stdout)

    def apply(self, snap: Snapshot) -> PodEgress | None:
        pod = snap.pod("shop", "app")
        assert pod is not None
        eg = compile_egress(snap, pod)
        vips = {s.cluster_ip for s in snap.services if s.cluster_ip}
        self.maps.apply({self.cookie: eg} if eg else {}, vips)
        return eg

    def connect(self, dst: str, port: int, *only: str) -> list[str]:
        res = subprocess.run(
            ["nsenter", f"--net=/run/netns/{self.ns}", sys.executable, "-c", CLIENT, self.cg, dst,
             str(port), *only],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        return res.stdout.split()

    def popen(self, script: str, *args: str, ns: str | None = None) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{ns or self.ns}", sys.executable, "-c", script, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert p.stdout is not None
        return p


def _stop(p: subprocess.Popen[str]) -> None:
    p.kill()
    p.wait()


@pytest.fixture
def pod() -> Iterator[Pod]:
    sfx = secrets.token_hex(2)
    ns, peer = f"am-{sfx}-h19p", f"am-{sfx}-h19r"
    root = f"/sys/fs/cgroup/unified/ambientmesh-test-h19-{sfx}"
    cg, proxy_cg = f"{root}/pod", f"{root}/ztunnel"
    pins = f"/sys/fs/bpf/ambientmesh-test-h19-{sfx}"
    veth, vpeer = f"h19{sfx}a", f"h19{sfx}b"
    r = BpfRedirector(pin_root=pins, ztunnel_cgroup=proxy_cg)
    made: list[str] = []
    maps: PolicyMaps | None = None
    try:
        for n in (ns, peer):
            subprocess.run(["ip", "netns", "add", n], check=True)
            made.append(n)
        for d in (root, cg, proxy_cg):
            os.mkdir(d)
        for cmd in (
            ["ip", "link", "add", veth, "netns", ns, "type", "veth", "peer", "name", vpeer,
             "netns", peer],
            ["ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{veth}.disable_ipv6=1"],
            ["ip", "netns", "exec", peer, "sysctl", "-qw", f"net.ipv6.conf.{vpeer}.disable_ipv6=1"],
            ["ip", "-n", ns, "addr", "add", f"{POD_IP}/24", "dev", veth],
            ["ip", "-n", peer, "addr", "add", f"{PEER_IP}/24", "dev", vpeer],
            ["ip", "-n", ns, "link", "set", "lo", "up"],
            ["ip", "-n", peer, "link", "set", "lo", "up"],
            ["ip", "-n", ns, "link", "set", veth, "up"],
            ["ip", "-n", peer, "link", "set", vpeer, "up"],
        ):  # fmt: skip
            subprocess.run(cmd, check=True)
        # a static neighbour: no ARP on the veth while we count its packets
        mac = subprocess.run(
            ["ip", "netns", "exec", peer, "cat", f"/sys/class/net/{vpeer}/address"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        subprocess.run(["ip", "-n", ns, "neigh", "replace", PEER_IP, "lladdr", mac, "nud",
                        "permanent", "dev", veth], check=True)  # fmt: skip
        r.install()
        r.enrol(cg)
        with NetNs(f"/run/netns/{ns}") as netns:
            s = netns.new_socket()
            cookie = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
            s.close()
        maps = PolicyMaps(pins)
        yield Pod(ns, cg, proxy_cg, veth, r, cookie, maps)
    finally:
        if maps is not None:
            maps.close()
        try:
            r.unenrol(cg)
            r.uninstall()
        finally:
            for d in (cg, proxy_cg, root):
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(d)
            for n in made:
                subprocess.run(["ip", "netns", "del", n], check=False)
            shutil.rmtree(pins, ignore_errors=True)


@contextlib.contextmanager
def running(p: Pod, with_proxy: bool = True) -> Iterator[None]:
    procs = [p.popen(SERVER, ns=p.ns.replace("h19p", "h19r"))]
    if with_proxy:
        procs.append(p.popen(FORWARDER, p.proxy_cg))
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield
    finally:
        for proc in procs:
            _stop(proc)


def test_denied_connect_is_eperm_at_once_and_sends_nothing(pod: Pod) -> None:
    pod.apply(parse_objects(_docs([80])))
    with running(pod), DropReader(pod.redirector.pin_root) as drops:
        drops.drain()
        before = pod.tx()
        got = pod.connect(PEER_IP, 81)
        assert got[0] == "eperm", got
        ms = float(got[1])
        print(f"denied connect() returned EPERM in {ms:.3f} ms")
        assert ms < 50
        assert pod.tx() == before, "a packet left the pod for a denied connect"
        # the allowed port works, through the proxy stand-in, and does use the veth
        assert pod.connect(PEER_IP, 80) == ["pong:ping"]
        assert pod.tx() > before
        name = "NetworkPolicy shop/app-out"
        assert drops.counts() == {("policy-denied", policy_id(name)): 1}
        (ev,) = drops.drain()
        assert (ev.reason, ev.policy_id, ev.dst_ip, ev.dst_port) == (
            "policy-denied", policy_id(name), PEER_IP, 81,
        )  # fmt: skip
        assert ev.netns_cookie == pod.cookie
        assert abs(ev.time - time.time()) < 60


def test_policy_change_applies_to_the_next_connect(pod: Pod) -> None:
    with running(pod):
        pod.apply(parse_objects(_docs([80])))
        assert pod.connect(PEER_IP, 80) == ["pong:ping"]
        gen = pod.maps.generation()
        pod.apply(parse_objects(_docs([81])))
        assert pod.maps.generation() == gen + 1
        assert pod.connect(PEER_IP, 80)[0] == "eperm"
        pod.apply(parse_objects(_docs([80, 81])))
        assert pod.connect(PEER_IP, 80) == ["pong:ping"]
        pod.apply(parse_objects(_docs([81])))
        assert pod.connect(PEER_IP, 80)[0] == "eperm"
        # no policy selects the pod any more: open again
        docs = [d for d in _docs([]) if d["kind"] != "NetworkPolicy"]
        assert pod.apply(parse_objects(docs)) is None
        assert pod.connect(PEER_IP, 80) == ["pong:ping"]


def test_only_two_generations_stay_in_the_maps(pod: Pod) -> None:
    from bpf import syscall

    for ports in ([80], [81], [82], [83]):
        pod.apply(parse_objects(_docs(ports)))
    gens = {int.from_bytes(k[:4], "little") for k in syscall.map_keys(pod.maps.fds["pol_pod"], 16)}
    g = pod.maps.generation()
    assert gens == {g, g - 1}


def test_ztunnel_down_is_eperm_counted_and_recorded(pod: Pod) -> None:
    """No listener at the redirect target (ztunnel stopped): EPERM, not ECONNREFUSED, and the
    drop is kept in the pinned maps for the ztunnel that starts next (a later reader)."""
    with DropReader(pod.redirector.pin_root) as drops:
        drops.drain()
    with running(pod, with_proxy=False):
        before = pod.tx()
        got = pod.connect(PEER_IP, 80)
        assert got[0] == "eperm", got
        print(f"connect() with ztunnel down returned EPERM in {float(got[1]):.3f} ms")
        assert pod.tx() == before
    with DropReader(pod.redirector.pin_root) as later:  # "ztunnel restarted"
        assert later.counts() == {("ztunnel-unavailable", 0): 1}
        (ev,) = later.drain()
        assert (ev.reason, ev.dst_ip, ev.dst_port, ev.policy_id) == (
            "ztunnel-unavailable", PEER_IP, 80, 0,
        )  # fmt: skip
        assert later.drain() == []
    with running(pod):  # ztunnel back: the same connect works
        assert pod.connect(PEER_IP, 80) == ["pong:ping"]


def test_ztunnel_side_names_counts_and_flows(pod: Pod) -> None:
    """What ztunnel does with the same maps: fill them for its enrolled pods (netns handles),
    export the kernel's counts as metrics, and turn each drained event into a DROPPED flow
    naming the pod and the policy."""
    from mesh.metrics import MeshMetrics
    from ztunnel.inpod.policy import KernelPolicy, drop_flow_fields

    snap = parse_objects(_docs([80]))
    kp = KernelPolicy(pod.redirector.pin_root, "node1")
    metrics = MeshMetrics()
    metrics.kernel_drops.source = kp.counts
    seen: list[dict[str, Any]] = []
    kp.on_drop = lambda ev, key, pol: seen.append(drop_flow_fields(ev, "node1", snap, key, pol))
    netns = NetNs(f"/run/netns/{pod.ns}")
    try:
        kp.drain()
        kp.apply(snap, {"shop/app": netns})
        with running(pod):
            assert pod.connect(PEER_IP, 81)[0] == "eperm"
            assert pod.connect(PEER_IP, 80) == ["pong:ping"]
        text = metrics.exposition().decode()
        assert (
            'ambientmesh_kernel_denied_total{direction="egress",policy="shop/app-out"} 1.0' in text
        )
        assert 'ambientmesh_kernel_drops_total{reason="policy-denied"} 1.0' in text
        assert len(kp.drain()) == 1
        (flow,) = seen
        assert flow["verdict"] == "DROPPED" and flow["reason"] == "policy denied"
        assert flow["policy"] == "shop/app-out"
        assert flow["source"]["pod"] == "app" and flow["source"]["ip"] == POD_IP
        assert (flow["destination"]["ip"], flow["destination"]["port"]) == (PEER_IP, 81)
        # the policy removed: the next connect is open again
        kp.apply(parse_objects([d for d in _docs([]) if d["kind"] != "NetworkPolicy"]),
                 {"shop/app": netns})  # fmt: skip
        with running(pod):
            assert pod.connect(PEER_IP, 80) == ["pong:ping"]
    finally:
        netns.close()
        kp.close()


def test_service_vip_is_judged_by_its_endpoints(pod: Pod) -> None:
    """Socket-LB semantics in the kernel: VIP:80 is allowed while the policy allows the
    service's endpoint on its target port, on the service port only, and denied once the
    policy no longer allows that endpoint."""
    with running(pod):
        pod.apply(parse_objects(_vip_docs(80)))
        assert pod.connect(VIP, 80, "connect-only") == ["connected"]
        assert pod.connect(VIP, 81, "connect-only")[0] == "eperm"  # not a service port
        with DropReader(pod.redirector.pin_root) as drops:
            drops.drain()
            got = pod.connect(PEER_IP, 80)
            assert got == ["pong:ping"], (got, drops.drain())  # the endpoint itself
        pod.apply(parse_objects(_vip_docs(8080)))
        assert pod.connect(VIP, 80, "connect-only")[0] == "eperm"
        assert pod.connect(PEER_IP, 80)[0] == "eperm"
