"""Hostile HBONE peers against ztunnel's inbound role, in this process, on loopback: real TLS,
real h2 on both sides, real sockets to a real app. Node n2 (127.0.0.2) serves HBONE; the app
(pod shop/echo, 127.0.0.3) counts its live connections, so an upstream that ztunnel forgot to
close shows up there and in this process's fds.

Each case asserts the refusal, that a good request succeeds right after, and that fds come
back to where they were.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.errors
import pytest

from certs.ca import CertificateAuthority
from mesh.config.parse import parse_objects
from mesh.config.snapshot import Snapshot
from mesh.hbone import HboneLimits, serve
from mesh.hbone.pool import Listener
from mesh.identity.manager import Identities
from mesh.metrics import MeshMetrics
from tests.adversarial.attackkit import Peer, fd_count, open_peer, tls_context
from tests.meshkit import WEB, sample, two_nodes
from ztunnel.proxy import InboundHbone, Node, Outbound

ECHO_IP = "127.0.0.3"


@dataclass
class App:
    """The destination app: echoes, and knows how many of its connections are open."""

    live: int = 0
    total: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.live += 1
        self.total += 1
        self.writers.append(writer)
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.live -= 1
            self.writers.remove(writer)
            writer.close()


@dataclass
class Target:
    ca: CertificateAuthority
    node: Node
    app: App
    app_port: int
    hbone_port: int
    snap: list[Snapshot]
    log: list[dict[str, Any]]

    def reconfigure(self, docs: list[dict[str, Any]]) -> None:
        self.snap[0] = parse_objects(docs)

    async def peer(self, identity: str | None = WEB, **kw: Any) -> Peer:
        return await open_peer("127.0.0.2", self.hbone_port, tls_context(self.ca, identity), **kw)

    async def good_request(self) -> None:
        """A well-behaved CONNECT right after the attack: answered 200, bytes echoed."""
        p = await self.peer()
        try:
            sid = p.connect(f"{ECHO_IP}:{self.app_port}")
            p.flush()
            assert await p.wait_for(sid) == 200
            p.h2.send_data(sid, b"still serving", end_stream=True)
            p.flush()
            for _ in range(20):
                await p.pump(until=0.5, settle=0.1)
                if bytes(p.data.get(sid, b"")) == b"still serving":
                    break
            assert bytes(p.data.get(sid, b"")) == b"still serving"
        finally:
            p.close()


async def settle_fds(baseline: int, slack: int = 2, wait: float = 10.0) -> int:
    n = fd_count()
    for _ in range(int(wait / 0.1)):
        n = fd_count()
        if n <= baseline + slack:
            break
        await asyncio.sleep(0.1)
    return n


@pytest.fixture
async def target(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    limits: HboneLimits = getattr(request, "param", HboneLimits())
    ca = CertificateAuthority.init(tmp_path / "ca")
    app = App()
    app_srv = await asyncio.start_server(app.serve, ECHO_IP, 0)
    app_port = int(app_srv.sockets[0].getsockname()[1])
    snap = [parse_objects(two_nodes(app_port, echo_ip=ECHO_IP))]
    node = Node("n2", lambda: snap[0], Identities(ca), MeshMetrics(), limits=limits)
    srv: Listener = await serve(
        "127.0.0.2", 0, node.identities.server_context(node.identity), InboundHbone(node),
        trust_domain="cluster.local", limits=limits, gate=node.gate,
        on_refused=node.hbone_refused,
    )  # fmt: skip
    node.add_listeners(None, srv.sockets)
    yield Target(ca, node, app, app_port, int(srv.sockets[0].getsockname()[1]), snap, [])
    srv.close()
    app_srv.close()
    for w in list(app.writers):
        w.transport.abort()
    await node.drain(0.1)
    await asyncio.sleep(0)


# -- reset streams ------------------------------------------------------------------------


async def test_reset_streams_leave_no_upstream_behind(target: Target) -> None:
    """N CONNECT + RST_STREAM pairs on one connection, some reset in the same write as the
    HEADERS (the dial is still pending), some a moment later (the dial may have finished):
    afterwards the app holds no connection from ztunnel and this process no extra fd."""
    await target.good_request()  # warm: certificates, contexts, lazy imports
    await asyncio.sleep(0.2)
    base = fd_count()
    p = await target.peer()
    authority = f"{ECHO_IP}:{target.app_port}"
    for i in range(300):
        sid = p.connect(authority)
        if i % 2:
            p.flush()
            await asyncio.sleep(0)  # let ztunnel start dialing before the reset arrives
        p.reset(sid)
        p.flush()
        if i % 50 == 49:
            await p.pump(until=0.5, settle=0.05)
    await p.pump(until=3, settle=0.5)
    assert not p.closed and p.goaway is None  # resets are no reason to drop the connection
    for _ in range(100):
        if target.app.live == 0:
            break
        await asyncio.sleep(0.05)
    assert target.app.live == 0, f"{target.app.live} upstream connections left open"
    p.close()
    assert await settle_fds(base) <= base + 2
    await target.good_request()


# -- stream limit -------------------------------------------------------------------------


async def test_streams_past_the_limit_before_settings_are_refused_one_by_one(
    target: Target,
) -> None:
    """150 CONNECTs in the client's first flight, before it could have seen our SETTINGS
    (limit 100): h2 alone would GOAWAY the whole connection; we refuse the extra 50 with
    REFUSED_STREAM and keep the 100."""
    p = await target.peer(send_preface=False)
    p.h2.initiate_connection()
    authority = f"{ECHO_IP}:{target.app_port}"
    sids = [p.connect(authority) for _ in range(150)]
    p.flush()  # preface, SETTINGS and 150 HEADERS in one write
    for _ in range(40):
        await p.pump(until=1.0, settle=0.2)
        if len(p.responses) + len(p.resets) >= 150:
            break
    assert p.goaway is None and not p.closed
    ok = [s for s in sids if p.responses.get(s) == 200]
    refused = [s for s in sids if p.resets.get(s) == h2.errors.ErrorCodes.REFUSED_STREAM]
    assert (len(ok), len(refused)) == (100, 50)
    assert sample(target.node.metrics, "ambientmesh_refused_total", reason="streams") == 50
    # after SETTINGS too: one more while 100 are open is refused, the connection stays
    extra = p.connect(authority)
    p.flush()
    await p.wait_for(extra)
    assert p.resets.get(extra) == h2.errors.ErrorCodes.REFUSED_STREAM
    # ending one stream frees a slot on the same connection
    p.reset(ok[0])
    p.flush()
    await asyncio.sleep(0.1)
    again = p.connect(authority)
    p.flush()
    assert await p.wait_for(again) == 200
    p.close()
    await target.good_request()


# -- source spoofing ----------------------------------------------------------------------


def only_from(cidr: str) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "only-vouched", "namespace": "shop"},
        "spec": {"selector": {"matchLabels": {"app": "echo"}}, "action": "ALLOW",
                 "rules": [{"from": [{"source": {"ipBlocks": [cidr]}}]}]},
    }  # fmt: skip


async def test_forwarded_for_from_a_workload_is_not_believed(
    target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    """A pod with its own SVID claims a source address it does not have, to pass an ipBlocks
    ALLOW: the claim is ignored, the policy decides on the real peer address (denied), and the
    access log shows the real one."""
    target.reconfigure([*two_nodes(target.app_port, echo_ip=ECHO_IP), only_from("10.9.9.9/32")])
    caplog.set_level("INFO", logger="mesh.access")
    p = await target.peer()
    sid = p.connect(f"{ECHO_IP}:{target.app_port}", [("forwarded", "for=10.9.9.9")])
    p.flush()
    assert await p.wait_for(sid) == 401
    p.close()
    assert sample(target.node.metrics, "ambientmesh_refused_total", reason="forwarded_ignored")
    lines = [r.getMessage() for r in caplog.records if r.name == "mesh.access"]
    assert lines and '"src.addr":"127.0.0.1"' in lines[-1] and "10.9.9.9" not in lines[-1]
    # the real address passes the same kind of policy: the refusal was the claim's
    target.reconfigure([*two_nodes(target.app_port, echo_ip=ECHO_IP), only_from("127.0.0.1/32")])
    await target.good_request()


async def test_a_workload_may_state_its_own_address_from_its_node(target: Target) -> None:
    """What ztunnel itself sends (the source pod's address, from the source node's address) is
    still believed: web's pod IP and n1's address are both 127.0.0.1 here, so claim web's
    address from 127.0.0.1 with web's identity."""
    target.reconfigure([*two_nodes(target.app_port, echo_ip=ECHO_IP), only_from("127.0.0.1/32")])
    p = await target.peer()
    sid = p.connect(f"{ECHO_IP}:{target.app_port}", [("forwarded", "for=127.0.0.1")])
    p.flush()
    assert await p.wait_for(sid) == 200
    p.close()


# -- self-loop ----------------------------------------------------------------------------


async def test_connect_to_ztunnels_own_listener_is_refused(target: Target) -> None:
    """CONNECT whose authority is the destination pod's address at the port of one of
    ztunnel's own listeners there (here an extra listener bound on the pod's address):
    refused (400), counted, nothing dialed."""
    extra = await asyncio.get_running_loop().create_server(asyncio.Protocol, ECHO_IP, 0)
    target.node.add_listeners(None, extra.sockets)
    port = int(extra.sockets[0].getsockname()[1])
    try:
        p = await target.peer()
        sid = p.connect(f"{ECHO_IP}:{port}")
        p.flush()
        assert await p.wait_for(sid) == 400
        p.close()
        assert sample(target.node.metrics, "ambientmesh_refused_total", reason="self_loop") == 1
        assert sample(target.node.metrics, "istio_tcp_connections_closed_total",
                      response_flags="NR") == 1  # fmt: skip
    finally:
        extra.close()
    await target.good_request()


async def test_outbound_to_its_own_address_is_refused_once_not_looped(tmp_path: Path) -> None:
    """An outbound listener whose connection's original destination is the listener itself
    (what 127.0.0.1:15001 from inside a pod is): the old code dialed it again and again, each
    round one more connection; now the first dial is refused. The resolver counts the rounds
    and stops a loop at 10 so the old code fails this test instead of exhausting fds."""
    ca = CertificateAuthority.init(tmp_path / "ca")
    snap = parse_objects(two_nodes(9))
    node = Node("n1", lambda: snap, Identities(ca), MeshMetrics())
    rounds = [0]
    where: list[tuple[str, int]] = []

    def resolve(_s: socket.socket) -> tuple[str, int]:
        rounds[0] += 1
        if rounds[0] > 10:
            raise OSError("loop stopped by the test")
        return where[0]

    loop = asyncio.get_running_loop()
    srv = await loop.create_server(Outbound(node, resolve).protocol, "127.0.0.1", 0)
    node.add_listeners(None, srv.sockets)
    where.append(("127.0.0.1", int(srv.sockets[0].getsockname()[1])))
    try:
        # from an address no pod has: a passthrough destination, dialed as plain TCP
        reader, writer = await asyncio.open_connection(*where[0], local_addr=("127.0.0.5", 0))
        writer.write(b"x")
        try:
            got = await asyncio.wait_for(reader.read(-1), 5)
        except ConnectionError:
            got = b""
        writer.close()
        assert got == b""
        for _ in range(20):
            await asyncio.sleep(0.05)
        assert rounds[0] == 1, f"{rounds[0]} nested connections"
        assert sample(node.metrics, "ambientmesh_refused_total", reason="self_loop") == 1
    finally:
        srv.close()
        await node.drain(0.1)


# -- connection limits, handshakes, headers -----------------------------------------------


@pytest.mark.parametrize(
    "target", [HboneLimits(max_connections_per_peer=3, handshake_timeout=0.5)], indirect=True
)
async def test_connections_past_the_per_peer_limit_are_refused_others_kept(
    target: Target,
) -> None:
    held = [await target.peer() for _ in range(3)]
    for h in held:
        await h.pump(until=0.5, settle=0.1)
    extra = await target.peer()
    await extra.pump(until=2, settle=1.0)
    assert extra.closed  # closed before its first stream
    assert sample(target.node.metrics, "ambientmesh_refused_total",
                  reason="connections_per_peer") == 1  # fmt: skip
    # the three held ones still work
    sid = held[0].connect(f"{ECHO_IP}:{target.app_port}")
    held[0].flush()
    assert await held[0].wait_for(sid) == 200
    for h in held:
        h.close()
    await asyncio.sleep(0.2)
    await target.good_request()


@pytest.mark.parametrize("target", [HboneLimits(handshake_timeout=0.5)], indirect=True)
async def test_stalled_handshakes_time_out(target: Target) -> None:
    base = fd_count()
    socks = []
    for _ in range(50):  # TCP connected, never a ClientHello
        s = socket.create_connection(("127.0.0.2", target.hbone_port))
        socks.append(s)
    await asyncio.sleep(1.5)
    for s in socks:
        s.settimeout(2)
        assert s.recv(1) == b""  # the server closed it
        s.close()
    assert sample(target.node.metrics, "ambientmesh_refused_total", reason="handshake") == 50
    assert await settle_fds(base) <= base + 2
    await target.good_request()


async def test_oversized_header_list_ends_only_that_connection(target: Target) -> None:
    bystander = await target.peer()
    sid = bystander.connect(f"{ECHO_IP}:{target.app_port}")
    bystander.flush()
    assert await bystander.wait_for(sid) == 200
    p = await target.peer()
    await p.pump(until=0.5, settle=0.1)
    p.connect(f"{ECHO_IP}:{target.app_port}", [("x-big", "a" * (200 * 1024))])
    p.flush()
    await p.pump(until=3, settle=1)
    assert p.closed or p.goaway is not None
    # the other connection's stream still echoes
    bystander.h2.send_data(sid, b"ping")
    bystander.flush()
    for _ in range(20):
        await bystander.pump(until=0.5, settle=0.1)
        if bytes(bystander.data.get(sid, b"")) == b"ping":
            break
    assert bytes(bystander.data.get(sid, b"")) == b"ping"
    bystander.close()
    await target.good_request()


async def test_tls_without_client_certificate_is_refused(target: Target) -> None:
    p: Peer | None = None
    try:
        p = await target.peer(identity=None)
        await p.pump(until=2, settle=1)
        assert p.closed
    except (ssl.SSLError, ConnectionError):
        pass
    finally:
        if p is not None:
            p.close()
    await target.good_request()


async def test_pending_dials_past_the_cap_are_refused_with_uo(
    target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    """An app that never answers SYNs (its accept queue is full) keeps dials pending; past
    `max_pending_dials` the next CONNECT is refused at once (503, UO) instead of queueing."""
    caplog.set_level("INFO", logger="mesh.access")
    target.node.max_pending_dials = 2
    full = socket.socket()
    full.bind((ECHO_IP, 0))
    full.listen(0)
    port = full.getsockname()[1]
    fillers = []
    for _ in range(2):  # the accept queue (backlog 0 holds one) and its SYN queue fill up
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex((ECHO_IP, port))
        fillers.append(filler)
    await asyncio.sleep(0.1)
    p = await target.peer()
    try:
        stuck = [p.connect(f"{ECHO_IP}:{port}") for _ in range(2)]
        p.flush()
        await p.pump(until=0.5, settle=0.2)
        assert target.node.pending_dials == 2
        sid = p.connect(f"{ECHO_IP}:{port}")
        p.flush()
        assert await p.wait_for(sid) == 503
        assert sample(target.node.metrics, "ambientmesh_refused_total", reason="pending_dials")
        lines = [r.getMessage() for r in caplog.records if r.name == "mesh.access"]
        assert any('"response_flags":"UO"' in x for x in lines)
        for stuck_sid in stuck:
            p.reset(stuck_sid)  # cancels the pending dials
        p.flush()
        await p.pump(until=0.5, settle=0.2)
        assert target.node.pending_dials == 0
    finally:
        p.close()
        for filler in fillers:
            filler.close()
        full.close()
    await target.good_request()


@pytest.mark.parametrize("target", [HboneLimits(idle_timeout=0.5)], indirect=True)
async def test_idle_connection_is_closed_by_the_server(target: Target) -> None:
    p = await target.peer()
    sid = p.connect(f"{ECHO_IP}:{target.app_port}")
    p.flush()
    assert await p.wait_for(sid) == 200
    await p.pump(until=1.0, settle=1.0)
    assert not p.closed  # a stream is open: not idle
    p.reset(sid)
    p.flush()
    await p.pump(until=3, settle=2.0)
    assert p.goaway is not None or p.closed
    p.close()
    await target.good_request()
