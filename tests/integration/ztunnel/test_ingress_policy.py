"""NetworkPolicy and CiliumNetworkPolicy on ztunnel's inbound paths, with real sockets, TLS and
h2 on loopback: a denied connection is refused before ztunnel dials the application (the app's
accept count stays 0), HBONE answers 403 naming the policy, plaintext is reset, the denial is
counted by policy, and AuthorizationPolicy still has its say when the network policy allows.

Node 2 (127.0.0.2) serves the echo pod (127.0.0.3); web (127.0.0.1) calls from node 1.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from certs.ca import CertificateAuthority
from mesh.config.parse import parse_objects
from mesh.config.snapshot import Snapshot
from mesh.config.source import ConfigStore
from mesh.hbone import HboneError, serve
from mesh.identity.manager import Identities
from mesh.metrics import MeshMetrics
from tests.meshkit import WEB, sample, two_nodes
from ztunnel.proxy import InboundHbone, InboundPlaintext, Node

ECHO_IP = "127.0.0.3"
NP = "NetworkPolicy shop/echo-from-admin"
CNP = "CiliumNetworkPolicy shop/echo-mtls"


def network_policy(app: str) -> dict[str, Any]:
    """echo accepts only pods labelled app=<app>, on any port."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "echo-from-admin", "namespace": "shop"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "echo"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": app}}}]}],
        },
    }


MTLS_CNP: dict[str, Any] = {
    "apiVersion": "cilium.io/v2",
    "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "echo-mtls", "namespace": "shop"},
    "spec": {
        "endpointSelector": {"matchLabels": {"app": "echo"}},
        "ingress": [
            {
                "authentication": {"mode": "required"},
                "fromEndpoints": [{"matchLabels": {"app": "web"}}],
            }
        ],
    },
}

HTTP_ONLY_CNP: dict[str, Any] = {
    "apiVersion": "cilium.io/v2",
    "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "echo-http", "namespace": "shop"},
    "spec": {
        "endpointSelector": {"matchLabels": {"app": "echo"}},
        "ingress": [
            {
                "fromEndpoints": [{"matchLabels": {"app": "web"}}],
                "toPorts": [{"rules": {"http": [{"method": "GET"}]}}],
            }
        ],
    },
}


@dataclass
class Rig:
    ids: Identities
    echo_port: int
    node: Node
    hbone_port: int
    plaintext_port: int
    client: Node
    snap: list[Snapshot]
    accepted: list[int] = field(default_factory=lambda: [0])
    closed: list[int] = field(default_factory=lambda: [0])

    def configure(self, *extra: dict[str, Any], deny_web: bool = False) -> None:
        self.snap[0] = parse_objects([*two_nodes(self.echo_port, deny=deny_web), *extra])

    async def connect(self) -> bool:
        """A CONNECT from web to echo through node 2's HBONE listener. ztunnel answers 200
        only once its dial to the application succeeded (raises HboneError otherwise)."""
        stream = await self.client.pool.connect(
            WEB, ("127.0.0.2", self.hbone_port), f"{ECHO_IP}:{self.echo_port}",
            expected_peers=frozenset({self.node.identity}),
        )  # fmt: skip
        stream.abort()
        return True

    async def plaintext(self) -> bytes:
        """Plain TCP from web (127.0.0.1) to node 2's plaintext listener; the echoed bytes."""
        reader, writer = await asyncio.open_connection("127.0.0.2", self.plaintext_port)
        writer.write(b"ping")
        try:
            return await asyncio.wait_for(reader.read(4), 10)
        except ConnectionError:
            return b""
        finally:
            writer.close()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    ca = CertificateAuthority.init(tmp_path / "ca")
    ids = Identities(ca)
    accepted = [0]
    closed = [0]

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted[0] += 1
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            closed[0] += 1
            writer.close()

    echo_srv = await asyncio.start_server(echo, ECHO_IP, 0)
    echo_port = echo_srv.sockets[0].getsockname()[1]
    snap = [parse_objects(two_nodes(echo_port))]
    node = Node("n2", lambda: snap[0], ids, MeshMetrics())
    hbone = await serve(
        "127.0.0.2", 0, ids.server_context(node.identity), InboundHbone(node),
        trust_domain="cluster.local",
    )  # fmt: skip
    plain = await asyncio.get_running_loop().create_server(
        InboundPlaintext(node, lambda _s: (ECHO_IP, echo_port)).protocol, "127.0.0.2", 0
    )
    hbone_port = hbone.sockets[0].getsockname()[1]
    client = Node("n1", lambda: snap[0], ids, MeshMetrics(), hbone_port=hbone_port)
    rig = Rig(
        ids, echo_port, node, hbone_port, plain.sockets[0].getsockname()[1], client, snap,
        accepted, closed,
    )  # fmt: skip
    yield rig
    for s in (plain, hbone, echo_srv):
        s.close()
    client.pool.close()
    for t in (*client.tasks, *node.tasks):
        t.cancel()


def denied(rig: Rig, policy: str) -> float:
    return sample(
        rig.node.metrics, "ambientmesh_policy_denied_total",
        policy=policy, direction="ingress", enforcement="ztunnel",
    )  # fmt: skip


async def test_network_policy_denies_before_the_dial(rig: Rig) -> None:
    rig.configure(network_policy("admin"))
    with pytest.raises(HboneError) as err:
        await rig.connect()
    assert err.value.status == 403
    assert NP in str(err.value)
    assert await rig.plaintext() == b""
    assert rig.accepted[0] == 0, "the application saw a connection policy denies"
    assert denied(rig, NP) == 2
    assert (
        sample(rig.node.metrics, "istio_tcp_connections_opened_total", response_flags="DENY") == 2
    )


async def test_network_policy_allows_its_peer(rig: Rig) -> None:
    rig.configure(network_policy("web"))
    assert await rig.connect()
    assert await rig.plaintext() == b"ping"
    assert rig.accepted[0] == 2
    assert denied(rig, NP) == 0


async def test_policy_change_applies_to_the_next_connection(rig: Rig) -> None:
    rig.configure(network_policy("web"))
    assert await rig.connect()
    rig.configure(network_policy("admin"))
    with pytest.raises(HboneError):
        await rig.connect()
    rig.configure()  # no policy: open again
    assert await rig.connect()
    assert rig.accepted[0] == 2


async def test_authentication_required_refuses_plaintext(rig: Rig) -> None:
    rig.configure(MTLS_CNP)
    assert await rig.connect()
    assert await rig.plaintext() == b""
    assert rig.accepted[0] == 1
    assert denied(rig, CNP) == 1


async def test_http_rules_need_the_waypoint(rig: Rig) -> None:
    """Only an HTTP rule admits web: straight to the pod (no waypoint to check requests) it is
    refused, over HBONE and plaintext alike."""
    rig.configure(HTTP_ONLY_CNP)
    with pytest.raises(HboneError) as err:
        await rig.connect()
    assert err.value.status == 403
    assert await rig.plaintext() == b""
    assert rig.accepted[0] == 0


async def test_both_policies_must_allow(rig: Rig) -> None:
    """The NetworkPolicy admits web; the AuthorizationPolicy denies it: denied (401), no dial."""
    rig.configure(network_policy("web"), deny_web=True)
    with pytest.raises(HboneError) as err:
        await rig.connect()
    assert err.value.status == 401
    assert rig.accepted[0] == 0
    assert denied(rig, NP) == 0


async def test_policy_change_cuts_live_connections_it_no_longer_allows(rig: Rig) -> None:
    """A plaintext connection and an HBONE stream are flowing; a NetworkPolicy that admits
    only app=admin arrives: both are cut at once (the app sees them close), and a policy
    that still admits web leaves them alone."""
    rig.configure(network_policy("web"))
    reader, writer = await asyncio.open_connection("127.0.0.2", rig.plaintext_port)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
    stream = await rig.client.pool.connect(
        WEB, ("127.0.0.2", rig.hbone_port), f"{ECHO_IP}:{rig.echo_port}",
        expected_peers=frozenset({rig.node.identity}),
    )  # fmt: skip
    assert len(rig.node.live_inbound) == 2
    rig.configure(network_policy("web"))  # a new snapshot that still allows both
    assert rig.node.revalidate_inbound(rig.snap[0]) == 0
    assert rig.closed[0] == 0

    rig.configure(network_policy("admin"))
    assert rig.node.revalidate_inbound(rig.snap[0]) == 2
    for _ in range(100):
        if rig.closed[0] == 2:
            break
        await asyncio.sleep(0.05)
    assert rig.closed[0] == 2, "the application still holds a connection policy now denies"
    with contextlib.suppress(ConnectionError):  # a reset is closed all the same
        assert await asyncio.wait_for(reader.read(), 10) == b""
    await asyncio.wait_for(stream.done, 10)
    assert not rig.node.live_inbound
    writer.close()


async def test_published_snapshot_cuts_through_the_store(rig: Rig) -> None:
    """The wiring ztunnel's main uses: `revalidate_on_change` follows the config store, so a
    policy published there cuts the live connection without anyone calling in."""
    store = ConfigStore(rig.snap[0])
    watcher = asyncio.create_task(rig.node.revalidate_on_change(store.subscribe))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.2", rig.plaintext_port)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
        await asyncio.sleep(0)  # let the watcher subscribe
        rig.configure(network_policy("admin"))
        store.publish(rig.snap[0])
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), 10) == b""
        for _ in range(100):
            if rig.closed[0] == 1:
                break
            await asyncio.sleep(0.05)
        assert rig.closed[0] == 1
        writer.close()
    finally:
        watcher.cancel()


async def test_authorization_policy_change_cuts_the_peers_live_connections(rig: Rig) -> None:
    """An AuthorizationPolicy that DENYs web's identity arrives while web's HBONE stream is
    flowing: the stream is cut, decided on the identity it was admitted with. The plaintext
    connection from the same address carries no identity, so that DENY (by principal) leaves
    it alone, until PeerAuthentication STRICT arrives, which cuts it too."""
    reader, writer = await asyncio.open_connection("127.0.0.2", rig.plaintext_port)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
    stream = await rig.client.pool.connect(
        WEB, ("127.0.0.2", rig.hbone_port), f"{ECHO_IP}:{rig.echo_port}",
        expected_peers=frozenset({rig.node.identity}),
    )  # fmt: skip
    assert len(rig.node.live_inbound) == 2

    rig.snap[0] = parse_objects(two_nodes(rig.echo_port, deny=True))
    assert rig.node.revalidate_inbound(rig.snap[0]) == 1
    await asyncio.wait_for(stream.done, 10)
    assert [c.authenticated for c in rig.node.live_inbound] == [False]
    writer.write(b"pong")  # the plaintext connection still flows
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"pong"

    rig.snap[0] = parse_objects(two_nodes(rig.echo_port, deny=True, strict=True))
    assert rig.node.revalidate_inbound(rig.snap[0]) == 1
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(reader.read(), 10) == b""
    for _ in range(100):
        if rig.closed[0] == 2:
            break
        await asyncio.sleep(0.05)
    assert rig.closed[0] == 2, "the application still holds a connection policy now denies"
    assert not rig.node.live_inbound
    writer.close()
