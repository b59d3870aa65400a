"""Local delivery (`ztunnel.proxy.local`): web and echo both enrolled with ztunnel n1 on one
node, web calling echo's Service VIP. ztunnel skips HBONE, and still makes the inbound side's
decisions (AuthorizationPolicy by principal, ingress NetworkPolicy, re-decided on change) and
records; `--local-delivery off` goes over HBONE to itself; `--fastpath on` pairs the splice in
the sockhash. The pods' netns, veth and netfilter of test_inpod, real; the sk_skb verdict
compiled and pinned by test_fastpath's fixture (root only)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bpf.fastpath import FastPathMaps
from certs.ca import CertificateAuthority
from mesh.config.parse import parse_objects
from mesh.config.source import ConfigStore
from mesh.flows import Flow, FlowRing
from mesh.hbone import serve
from mesh.identity.manager import Identities
from mesh.metrics import MeshMetrics
from mesh.netns import NetNs
from tests.e2e.ztunnel.test_egress_live import _egress
from tests.e2e.ztunnel.test_fastpath import pins  # noqa: F401 (fixture)
from tests.e2e.ztunnel.test_inpod import (  # noqa: F401 (fixtures)
    APP_PORT,
    WEB_ID,
    Pods,
    ask,
    echo,
    manifest,
    pods,
    talk_from,
)
from tests.meshkit import sample
from ztunnel.inpod.protocol import EnrolServer
from ztunnel.inpod.workloadmanager import WorkloadManager
from ztunnel.proxy import InboundHbone, Node
from ztunnel.proxy.fastpath import FastPath

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for netns and BPF")

ECHO_ID = "spiffe://cluster.local/ns/shop/sa/echo"


def docs(p: Pods, *extra: dict[str, Any], strict: bool = True) -> list[dict[str, Any]]:
    """test_inpod's manifest with echo moved beside web, on n1 (STRICT unless told)."""
    out = manifest(p.a_ip, p.b_ip, p.vip, strict=strict)
    for d in out:
        if d["kind"] == "Pod" and d["metadata"]["name"] == "echo":
            d["spec"]["nodeName"] = "n1"
    return [*out, *extra]


def deny_web() -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "no-web", "namespace": "shop"},
        "spec": {"selector": {"matchLabels": {"app": "echo"}}, "action": "DENY",
                 "rules": [{"from": [{"source": {"principals": [WEB_ID[len("spiffe://"):]]}}]}]},
    }  # fmt: skip


def echo_ingress(ports: list[int]) -> dict[str, Any]:
    """echo admits web on `ports` only."""
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "echo-in", "namespace": "shop"},
        "spec": {"podSelector": {"matchLabels": {"app": "echo"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                              "ports": [{"port": p} for p in ports]}]},
    }  # fmt: skip


@dataclass
class One:
    pods: Pods
    store: ConfigStore
    n1: Node
    flows: FlowRing

    def publish(self, *extra: dict[str, Any], strict: bool = True) -> None:
        self.store.publish(parse_objects(docs(self.pods, *extra, strict=strict)))

    def records(self) -> list[Flow]:
        return self.flows.since(0)[0]


@pytest.fixture
async def one(pods: Pods, tmp_path: Path) -> AsyncIterator[One]:  # noqa: F811
    """ztunnel n1 alone, both pods enrolled with it, its node-level HBONE listener on
    127.0.0.1 (n1's address) for the HBONE-to-self comparison."""
    store = ConfigStore()
    store.publish(parse_objects(docs(pods)))
    ids = Identities(CertificateAuthority.init(tmp_path / "ca"))
    flows = FlowRing(64, node="n1", proxy="ztunnel")
    n1 = Node("n1", lambda: store.current, ids, MeshMetrics(), flows=flows)
    hbone = await serve("127.0.0.1", 0, ids.listener_context(n1.identity), InboundHbone(n1),
                        trust_domain="cluster.local")  # fmt: skip
    n1.hbone_port = hbone.sockets[0].getsockname()[1]
    m1 = WorkloadManager(n1)
    e1 = EnrolServer(tmp_path / "n1.sock", m1)
    await e1.start()
    b = NetNs(f"/run/netns/{pods.b_ns}")
    app = await asyncio.start_server(echo, sock=b.listen("0.0.0.0", APP_PORT))
    tasks = [
        asyncio.create_task(m1.run(store.subscribe)),
        asyncio.create_task(n1.revalidate_on_change(store.subscribe)),
    ]
    try:
        for name, ns in (("web", pods.a_ns), ("echo", pods.b_ns)):
            reply = await ask(tmp_path / "n1.sock", op="add", namespace="shop", name=name,
                              netns=f"/run/netns/{ns}", cgroup=None)  # fmt: skip
            assert reply == {"ok": True, "enrolled": True}, reply
        yield One(pods, store, n1, flows)
    finally:
        for t in tasks:
            t.cancel()
        await e1.close()
        await m1.close()
        await n1.drain(0.1)
        app.close()
        hbone.close()
        b.close()


async def _open(p: Pods) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    ns = NetNs(f"/run/netns/{p.a_ns}")
    try:
        sock = await ns.connect(p.vip, 80, connect_timeout=5)
    finally:
        ns.close()
    reader, writer = await asyncio.open_connection(sock=sock)
    hello = f"{p.b_ip}|".encode()  # echo says who called: the inbound path's own address
    assert await asyncio.wait_for(reader.readexactly(len(hello)), 10) == hello
    return reader, writer


async def _roundtrip(p: Pods, size: int) -> None:
    """`size` random bytes there and back, then a half-close that echo answers with its own."""
    reader, writer = await _open(p)
    blob = os.urandom(size)

    async def send() -> None:
        writer.write(blob)
        await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    back = await asyncio.wait_for(reader.readexactly(size), 60)
    await sender
    assert hashlib.sha256(back).digest() == hashlib.sha256(blob).digest()
    assert await asyncio.wait_for(reader.read(), 10) == b""  # echo's FIN after ours
    writer.close()


async def _settled(one: One, n: int) -> list[Flow]:
    for _ in range(100):
        recs = one.records()
        if len(recs) >= n:
            return recs
        await asyncio.sleep(0.05)
    return one.records()


async def test_local_delivery_carries_bytes_and_records_both_sides(one: One) -> None:
    p = one.pods
    await _roundtrip(p, 8 << 20)
    assert one.n1.pool.stats() == []  # no HBONE spoken
    recs = await _settled(one, 2)
    assert len(recs) == 2  # the outbound and the inbound record, as over HBONE
    for f in recs:
        assert f.verdict == "FORWARDED" and f.mtls
        assert f.src_identity == WEB_ID
        assert f.src_ip == p.a_ip and f.dst_ip == p.b_ip and f.dst_port == APP_PORT
        assert f.bytes_sent == 8 << 20 and f.bytes_received == (8 << 20) + len(p.b_ip) + 1
    # the source side names the peer HBONE would have verified (n1's ztunnel), the
    # destination side the pod itself, exactly as the two HBONE records do
    assert sorted(str(f.dst_identity) for f in recs) == sorted([ECHO_ID, one.n1.identity])
    for reporter in ("source", "destination"):
        assert sample(one.n1.metrics, "istio_tcp_connections_opened_total", reporter=reporter,
                      source_principal=WEB_ID, connection_security_policy="mutual_tls",
                      destination_workload="echo") == 1, reporter  # fmt: skip
    # STRICT (in the manifest) holds: the plaintext port of echo still refuses web directly
    assert await talk_from(p.a_ns, p.b_ip, APP_PORT, b"plain") == b""


async def test_local_delivery_off_goes_over_hbone_to_itself(one: One) -> None:
    one.n1.local_delivery = False
    await _roundtrip(one.pods, 1 << 20)
    stats = one.n1.pool.stats()
    assert len(stats) == 1 and stats[0]["streams_opened"] == 1, stats
    # the same two records as the local path writes
    recs = await _settled(one, 2)
    assert sorted(f.src_identity or "" for f in recs) == [WEB_ID, WEB_ID]
    assert sorted(str(f.dst_identity) for f in recs) == sorted([ECHO_ID, one.n1.identity])
    assert all(f.mtls and f.verdict == "FORWARDED" for f in recs)


async def test_authorization_policy_deny_by_principal_is_enforced(one: One) -> None:
    p = one.pods
    one.publish(deny_web())
    assert await talk_from(p.a_ns, p.vip, 80, b"x") == b""
    recs = await _settled(one, 2)
    denied = [f for f in recs if f.verdict == "DENIED"]
    assert len(denied) == 2, [f.to_dict() for f in recs]
    assert any(f.policy == "shop/no-web" or f.policy == "no-web" for f in denied), [
        f.policy for f in denied
    ]
    assert sample(one.n1.metrics, "istio_tcp_connections_opened_total", reporter="destination",
                  response_flags="DENY", source_principal=WEB_ID) == 1  # fmt: skip
    assert one.n1.pool.stats() == []
    one.publish()
    await asyncio.sleep(0.1)
    assert (await talk_from(p.a_ns, p.vip, 80, b"y")).endswith(b"|y")


async def test_ingress_network_policy_is_enforced_and_cuts_live_connections(one: One) -> None:
    p = one.pods
    one.publish(echo_ingress([APP_PORT + 1]))
    assert await talk_from(p.a_ns, p.vip, 80, b"x") == b""
    one.publish(echo_ingress([APP_PORT]))
    await asyncio.sleep(0.1)
    reader, writer = await _open(p)
    writer.write(b"one")
    assert await asyncio.wait_for(reader.readexactly(3), 10) == b"one"
    one.publish(echo_ingress([APP_PORT + 1]))  # no longer allowed: the live one is cut
    try:
        rest = await asyncio.wait_for(reader.read(), 10)
    except ConnectionError:
        rest = b""
    assert rest == b""
    writer.close()
    assert not one.n1.live_inbound


async def test_egress_policy_change_cuts_a_live_local_connection(one: One) -> None:
    p = one.pods
    one.publish(_egress([APP_PORT]))
    await asyncio.sleep(0.1)
    reader, writer = await _open(p)
    writer.write(b"one")
    assert await asyncio.wait_for(reader.readexactly(3), 10) == b"one"
    one.publish(_egress([APP_PORT + 1]))  # web may no longer reach echo's port
    try:
        rest = await asyncio.wait_for(reader.read(), 10)
    except ConnectionError:
        rest = b""
    assert rest == b""
    writer.close()
    assert not one.n1.live_inbound


async def test_fastpath_pairs_the_local_splice(one: One, pins: str) -> None:  # noqa: F811
    maps = FastPathMaps.open_pinned(pins)
    one.n1.fastpath = fast = FastPath(maps)
    try:
        await _roundtrip(one.pods, 8 << 20)
        assert fast.engaged == 1
        recs = await _settled(one, 2)
        assert all(f.bytes_sent == 8 << 20 and f.mtls for f in recs)
        for _ in range(100):
            if maps.in_sockhash() == 0:
                break
            await asyncio.sleep(0.05)
        assert maps.in_sockhash() == 0
    finally:
        one.n1.fastpath = None
        maps.close()
