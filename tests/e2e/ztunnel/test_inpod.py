"""In-pod mode with real network namespaces and real netfilter (root only).

Two pod netns joined by a veth pair; two ztunnels (nodes n1, n2) in this process, each with its
workload manager and enrolment socket. Pod `web` (n1) has a netfilter REDIRECT sending its
connects to the service VIP to 127.0.0.1:15001 in its own netns, where only the listener
ztunnel opened *inside* that netns can be; pod `echo` (n2) has the inbound REDIRECT to 15006
that the BPF redirector installs. So every byte here crossed listeners that exist only because
enrolment opened them in the pods' namespaces.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from certs.ca import CertificateAuthority
from mesh.config.parse import parse_objects
from mesh.config.snapshot import Snapshot
from mesh.config.source import ConfigStore
from mesh.hbone import serve
from mesh.identity.manager import Identities
from mesh.metrics import MeshMetrics
from mesh.netns import NetNs
from tests.meshkit import sample
from ztunnel.inpod.protocol import EnrolServer
from ztunnel.inpod.workloadmanager import WorkloadManager
from ztunnel.proxy import InboundHbone, Node

WEB_ID = "spiffe://cluster.local/ns/shop/sa/web"
APP_PORT = 8080


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def manifest(a: str, b: str, vip: str, *, web_ambient: bool = True, strict: bool = False,
             ) -> list[dict[str, Any]]:  # fmt: skip
    amb = {"istio.io/dataplane-mode": "ambient"}
    web_labels = {"app": "web"} | ({} if web_ambient else {"istio.io/dataplane-mode": "none"})
    docs: list[dict[str, Any]] = [
        {"kind": "Node", "apiVersion": "v1", "metadata": {"name": "n1"},
         "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}]}},
        {"kind": "Node", "apiVersion": "v1", "metadata": {"name": "n2"},
         "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.2"}]}},
        {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": "shop", "labels": amb}},
        {"kind": "Pod", "apiVersion": "v1",
         "metadata": {"name": "web", "namespace": "shop", "labels": web_labels},
         "spec": {"nodeName": "n1", "serviceAccountName": "web"}, "status": {"podIP": a}},
        {"kind": "Pod", "apiVersion": "v1",
         "metadata": {"name": "echo", "namespace": "shop", "labels": {"app": "echo"}},
         "spec": {"nodeName": "n2", "serviceAccountName": "echo"}, "status": {"podIP": b}},
        {"kind": "Service", "apiVersion": "v1", "metadata": {"name": "echo", "namespace": "shop"},
         "spec": {"clusterIP": vip, "selector": {"app": "echo"},
                  "ports": [{"port": 80, "targetPort": APP_PORT}]}},
    ]  # fmt: skip
    if strict:
        docs.append(
            {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
             "metadata": {"name": "strict", "namespace": "shop"},
             "spec": {"mtls": {"mode": "STRICT"}}}
        )  # fmt: skip
    return docs


@dataclass
class Pods:
    a_ns: str
    b_ns: str
    a_ip: str
    b_ip: str
    vip: str


@pytest.fixture
def pods() -> Any:
    sfx = secrets.token_hex(2)
    a_ns, b_ns = f"am-{sfx}-web", f"am-{sfx}-echo"
    net = f"10.{0x40 + int(sfx[:2], 16) % 64}.{int(sfx[2:], 16)}"
    p = Pods(a_ns, b_ns, f"{net}.2", f"{net}.3", f"10.96.{int(sfx[2:], 16)}.10")
    made: list[str] = []
    try:
        for ns in (a_ns, b_ns):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", f"am{sfx}a", "netns", a_ns, "type", "veth",
           "peer", "name", f"am{sfx}b", "netns", b_ns)  # fmt: skip
        for ns, dev, ip in ((a_ns, f"am{sfx}a", p.a_ip), (b_ns, f"am{sfx}b", p.b_ip)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "route", "add", "default", "dev", dev)  # the VIP needs a route
        # web: connects to the VIP go to ztunnel's in-pod outbound listener (what BPF does)
        sh(
            "ip",
            "netns",
            "exec",
            a_ns,
            "iptables",
            "-w",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            p.vip,
            "--dport",
            "80",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        )
        # echo: plaintext arriving from outside goes to the in-pod 15006 (the enrol rule)
        sh("ip", "netns", "exec", b_ns, "iptables", "-w", "-t", "nat", "-A", "PREROUTING",
           "-p", "tcp", "!", "-i", "lo", "-m", "multiport", "!", "--dports",
           "15001,15006,15008", "-j", "REDIRECT", "--to-ports", "15006")  # fmt: skip
        yield p
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    peer = writer.get_extra_info("peername")[0]
    writer.write(f"{peer}|".encode())
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.close()


@dataclass
class Mesh:
    pods: Pods
    store: ConfigStore
    n1: Node
    n2: Node
    m1: WorkloadManager
    m2: WorkloadManager
    sock1: Path
    sock2: Path

    def config(self, **kw: bool) -> Snapshot:
        p = self.pods
        return self.store.publish(parse_objects(manifest(p.a_ip, p.b_ip, p.vip, **kw)))


@pytest.fixture
async def mesh(pods: Pods, tmp_path: Path) -> AsyncIterator[Mesh]:
    store = ConfigStore()
    store.publish(parse_objects(manifest(pods.a_ip, pods.b_ip, pods.vip)))
    ids = Identities(CertificateAuthority.init(tmp_path / "ca"))
    n2 = Node("n2", lambda: store.current, ids, MeshMetrics())
    hbone = await serve("127.0.0.2", 0, ids.listener_context(n2.identity), InboundHbone(n2),
                        trust_domain="cluster.local")  # fmt: skip
    n1 = Node("n1", lambda: store.current, ids, MeshMetrics(),
              hbone_port=hbone.sockets[0].getsockname()[1])  # fmt: skip
    m1, m2 = WorkloadManager(n1), WorkloadManager(n2)
    e1, e2 = EnrolServer(tmp_path / "n1.sock", m1), EnrolServer(tmp_path / "n2.sock", m2)
    await e1.start()
    await e2.start()
    b = NetNs(f"/run/netns/{pods.b_ns}")
    app = await asyncio.start_server(echo, sock=b.listen("0.0.0.0", APP_PORT))
    tasks = [asyncio.create_task(m.run(store.subscribe)) for m in (m1, m2)]
    try:
        yield Mesh(pods, store, n1, n2, m1, m2, tmp_path / "n1.sock", tmp_path / "n2.sock")
    finally:
        for t in tasks:
            t.cancel()
        for e in (e1, e2):
            await e.close()
        for m in (m1, m2):
            await m.close()
        for n in (n1, n2):
            await n.drain(0.1)
        app.close()
        hbone.close()
        b.close()


async def ask(path: Path, **req: Any) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(json.dumps(req).encode() + b"\n")
    line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    return dict(json.loads(line))


async def enrol_both(m: Mesh) -> None:
    p = m.pods
    for sock, name, ns in ((m.sock1, "web", p.a_ns), (m.sock2, "echo", p.b_ns)):
        reply = await ask(sock, op="add", namespace="shop", name=name,
                          netns=f"/run/netns/{ns}", cgroup=None)  # fmt: skip
        assert reply == {"ok": True, "enrolled": True}, reply


async def talk_from(netns: str, host: str, port: int, payload: bytes) -> bytes:
    """Connect from inside `netns` (so its netfilter rules apply), send, half-close, read."""
    ns = NetNs(f"/run/netns/{netns}")
    try:
        sock = await ns.connect(host, port, connect_timeout=5)
    finally:
        ns.close()
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(payload)
    writer.write_eof()
    try:
        data = await asyncio.wait_for(reader.read(-1), 10)
    except ConnectionError:
        data = b""
    writer.close()
    return data


async def test_vip_connect_from_pod_tunnels_through_in_pod_listeners(mesh: Mesh) -> None:
    p = mesh.pods
    # Not enrolled yet: nothing listens on 127.0.0.1:15001 inside web's netns (fails closed).
    with pytest.raises(ConnectionRefusedError):
        await talk_from(p.a_ns, p.vip, 80, b"too early")
    await enrol_both(mesh)
    got = await talk_from(p.a_ns, p.vip, 80, b"hello from web")
    # Delivered from inside echo's netns (its own address), after crossing HBONE with web's
    # identity: n2 saw web's certificate over mutual TLS.
    assert got == f"{p.b_ip}|hello from web".encode()
    assert (
        sample(
            mesh.n2.metrics,
            "istio_tcp_connections_opened_total",
            source_principal=WEB_ID,
            connection_security_policy="mutual_tls",
            destination_workload="echo",
        )
        == 1
    )
    listed = await ask(mesh.sock1, op="list")
    assert listed["ok"] and listed["pods"][0]["pod"] == "shop/web"
    assert f"127.0.0.1:15001" in listed["pods"][0]["listeners"]  # noqa: F541


async def test_plaintext_into_enrolled_pod_obeys_peer_authentication(mesh: Mesh) -> None:
    p = mesh.pods
    await enrol_both(mesh)
    # web -> echo's own address (not the VIP): plaintext on the wire, caught by echo's 15006
    assert await talk_from(p.a_ns, p.b_ip, APP_PORT, b"plain") == f"{p.b_ip}|plain".encode()
    mesh.config(strict=True)
    await asyncio.sleep(0)
    assert await talk_from(p.a_ns, p.b_ip, APP_PORT, b"plain") == b""
    assert (
        sample(
            mesh.n2.metrics,
            "istio_tcp_connections_opened_total",
            response_flags="DENY",
            connection_security_policy="none",
        )
        == 1
    )


async def test_unlabel_unenrols_live_and_relabel_enrols_again(mesh: Mesh) -> None:
    p = mesh.pods
    await enrol_both(mesh)
    assert (await talk_from(p.a_ns, p.vip, 80, b"x")).endswith(b"|x")
    mesh.config(web_ambient=False)
    for _ in range(50):
        if "shop/web" not in mesh.m1.enrolled:
            break
        await asyncio.sleep(0.02)
    assert "shop/web" not in mesh.m1.enrolled
    # the listener is gone from web's netns: the redirected connect is refused
    with pytest.raises(ConnectionRefusedError):
        await talk_from(p.a_ns, p.vip, 80, b"x")
    assert (await ask(mesh.sock1, op="list"))["pods"][0]["enrolled"] is False
    mesh.config(web_ambient=True)  # remembered request: enrolled again without being asked
    for _ in range(50):
        if "shop/web" in mesh.m1.enrolled:
            break
        await asyncio.sleep(0.02)
    assert (await talk_from(p.a_ns, p.vip, 80, b"y")).endswith(b"|y")


async def test_del_closes_listeners_and_bad_requests_are_answered(mesh: Mesh) -> None:
    p = mesh.pods
    await enrol_both(mesh)
    assert await ask(mesh.sock1, op="del", namespace="shop", name="web") == {
        "ok": True, "known": True}  # fmt: skip
    with pytest.raises(ConnectionRefusedError):
        await talk_from(p.a_ns, p.vip, 80, b"x")
    bad = await ask(mesh.sock1, op="add", namespace="shop", name="web", netns="/etc/hostname")
    assert bad["ok"] is False and "/etc/hostname" in bad["error"]
    bad = await ask(mesh.sock1, op="add", namespace="shop")
    assert bad["ok"] is False and "'name'" in bad["error"]
    bad = await ask(mesh.sock1, op="fly")
    assert bad["ok"] is False and "fly" in bad["error"]
    # a pod the config never mentions: waited for briefly, then reported as not enrolled
    mesh.m1.wait_timeout = 0.2
    reply = await ask(mesh.sock1, op="add", namespace="shop", name="ghost",
                      netns=f"/run/netns/{p.a_ns}")  # fmt: skip
    assert reply == {"ok": True, "enrolled": False}
    # raw garbage on the socket: answered, and the server keeps serving
    r, w = await asyncio.open_unix_connection(str(mesh.sock1))
    w.write(b"{not json\n")
    assert json.loads(await r.readline())["ok"] is False
    w.close()
    assert (await ask(mesh.sock1, op="list"))["ok"] is True
