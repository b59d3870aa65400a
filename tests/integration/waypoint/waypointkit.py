"""A small mesh on loopback for waypoint tests: real ztunnels, a real waypoint, real backends.

    client ─TCP─► ztunnel n1 outbound ─HBONE(mTLS,h2)─► waypoint ─HBONE─► ztunnel n2 inbound ─► pod

Node n1 is 127.0.0.1 (the client pod lives there), node n2 is 127.0.0.2 (the backends' node);
pods have their own 127.0.0.x addresses and the backends listen on them. The original
destination of an outbound connection comes from a per-listener resolver (BPF/netfilter give
it in the e2e tests); everything after that is the production path. Config is a list of
manifests: `apply(extra)` re-parses and swaps the snapshot, as a FileSource would.

The backends are `tests.fakes.backend.Backend`: the lab's echo (JSON describing what it
received: pod, method, path, headers, body_bytes), misbehaving on request (`/status/N`,
`/delay/MS`, `/reset`, `/flaky/N/KEY`, ...; see there). The client is the lab's
(`mesh.apps.client`).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from certs.ca import CertificateAuthority
from mesh.apps.client import exchange
from mesh.config.parse import parse_objects
from mesh.config.snapshot import Snapshot
from mesh.hbone import serve
from mesh.identity.manager import Identities
from mesh.metrics import MeshMetrics
from tests.fakes.backend import Backend, BackendStats
from waypoint.proxy import Waypoint
from ztunnel.proxy import InboundHbone, Node, Outbound

NS = "mesh"
TD = "cluster.local"
CLIENT_ID = f"spiffe://{TD}/ns/{NS}/sa/client"
WAYPOINT_ID = f"spiffe://{TD}/ns/{NS}/sa/waypoint"
ECHO_VIP = "10.96.0.10"
ECHO_V1_VIP = "10.96.0.11"
ECHO_V2_VIP = "10.96.0.12"
GRPC_VIP = "10.96.0.20"
PLAIN_VIP = "10.96.0.30"  # a service opted out of the waypoint: the L4 path
CLIENT_IP = "127.0.0.1"
CONSUMER_NS = "consumer"
CONSUMER_IP = "127.0.0.7"  # a client pod in another namespace (consumer routes)
ECHO_V2_IP = "127.0.0.4"

Doc = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# The client pod's HTTP/1.1 client: the lab's (`mesh.apps.client`), off the event loop


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]  # lower-case names
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


class HttpClient:
    """A keep-alive HTTP/1.1 client connection (through ztunnel's outbound listener). Its
    blocking calls run in a thread: the mesh it talks to runs on this test's event loop."""

    def __init__(self, conn: http.client.HTTPConnection) -> None:
        self.conn = conn

    @classmethod
    async def connect(cls, port: int, source: str = "127.0.0.1") -> HttpClient:
        """`source`: the client pod's address (ztunnel finds the source pod by it)."""
        conn = http.client.HTTPConnection("127.0.0.1", port, source_address=(source, 0))
        await asyncio.to_thread(conn.connect)
        return cls(conn)

    async def request(
        self,
        path: str,
        *,
        method: str = "GET",
        host: str = "echo",
        headers: list[tuple[str, str]] | None = None,
        body: bytes | None = None,
        deadline: float = 20.0,
    ) -> Response:
        assert self.conn.sock is not None
        self.conn.sock.settimeout(deadline)
        hs = {"host": host, **dict(headers or [])}
        try:
            resp, raw = await asyncio.to_thread(exchange, self.conn, method, path, hs, body)
        except http.client.IncompleteRead:
            raise ConnectionError("connection closed before a complete response") from None
        return Response(resp.status, [(k.lower(), v) for k, v in resp.getheaders()], raw)

    def close(self) -> None:
        self.conn.close()


# ---------------------------------------------------------------------------------------------
# The mesh


def base_manifest(wp_port: int, echo_port: int, grpc_port: int) -> list[Doc]:
    amb = {"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "waypoint"}

    def pod(name: str, ip: str, node: str, labels: dict[str, str], sa: str | None = None) -> Doc:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": {"nodeName": node, "serviceAccountName": sa or name},
            "status": {"podIP": ip},
        }

    def svc(
        name: str,
        vip: str,
        selector: dict[str, str],
        ports: list[Doc],
        labels: dict[str, str] | None = None,
    ) -> Doc:
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": NS, "labels": labels or {}},
            "spec": {"clusterIP": vip, "selector": selector, "ports": ports},
        }

    http = {"appProtocol": "http"}
    return [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
         "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}]}},
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n2"},
         "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.2"}]}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "labels": amb}},
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": CONSUMER_NS, "labels": {"istio.io/dataplane-mode": "ambient"}}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "consumer", "namespace": CONSUMER_NS, "labels": {"app": "c"}},
         "spec": {"nodeName": "n1", "serviceAccountName": "consumer"},
         "status": {"podIP": CONSUMER_IP}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
         "metadata": {"name": "waypoint", "namespace": NS},
         "spec": {"gatewayClassName": "waypoint",
                  "listeners": [{"name": "mesh", "port": wp_port, "protocol": "HBONE"}]}},
        pod("client", "127.0.0.1", "n1", {"app": "client"}),
        pod("waypoint", "127.0.0.9", "n1",
            {"gateway.networking.k8s.io/gateway-name": "waypoint",
             "istio.io/dataplane-mode": "none"}),
        pod("echo-v1", "127.0.0.3", "n2", {"app": "echo", "version": "v1"}, "echo"),
        pod("echo-v2", "127.0.0.4", "n2", {"app": "echo", "version": "v2"}, "echo"),
        pod("grpc", "127.0.0.5", "n2", {"app": "grpc"}),
        svc("echo", ECHO_VIP, {"app": "echo"},
            [{"name": "http", "port": 80, "targetPort": echo_port, **http},
             {"name": "http-alt", "port": 8080, "targetPort": echo_port, **http}]),
        svc("echo-v1", ECHO_V1_VIP, {"app": "echo", "version": "v1"},
            [{"name": "http", "port": 80, "targetPort": echo_port, **http},
             {"name": "http-alt", "port": 8080, "targetPort": echo_port, **http}]),
        svc("echo-v2", ECHO_V2_VIP, {"app": "echo", "version": "v2"},
            [{"name": "http", "port": 80, "targetPort": echo_port, **http},
             {"name": "http-alt", "port": 8080, "targetPort": echo_port, **http}]),
        svc("grpc", GRPC_VIP, {"app": "grpc"},
            [{"name": "grpc", "port": 50051, "targetPort": grpc_port, "appProtocol": "grpc"}]),
        svc("plain", PLAIN_VIP, {"app": "echo"}, [{"port": 80, "targetPort": echo_port}],
            labels={"istio.io/use-waypoint": "none"}),
    ]  # fmt: skip


@dataclass
class Mesh:
    snap: list[Snapshot]
    base: list[Doc]
    n1: Node
    n2: Node
    waypoint: Waypoint
    echo_port: int
    grpc_port: int
    stats: dict[str, BackendStats]
    _servers: list[asyncio.AbstractServer] = field(default_factory=list)
    _outbound: dict[tuple[str, int], int] = field(default_factory=dict)

    def apply(self, extra: list[Doc]) -> None:
        """Swap in a snapshot of the base manifest plus `extra` (routes, policies)."""
        self.snap[0] = parse_objects([*self.base, *extra])

    async def port_for(self, vip: str, port: int) -> int:
        """A client-side listener of ztunnel n1 whose connections were headed to vip:port."""
        key = (vip, port)
        if key not in self._outbound:
            resolve: Callable[[socket.socket], tuple[str, int]] = lambda _s: key  # noqa: E731
            srv = await asyncio.get_running_loop().create_server(
                Outbound(self.n1, resolve).protocol, "127.0.0.1", 0
            )
            self._servers.append(srv)
            self._outbound[key] = srv.sockets[0].getsockname()[1]
        return self._outbound[key]

    async def client(
        self, vip: str = ECHO_VIP, port: int = 80, source: str = CLIENT_IP
    ) -> HttpClient:
        return await HttpClient.connect(await self.port_for(vip, port), source)

    async def get(
        self,
        path: str,
        vip: str = ECHO_VIP,
        port: int = 80,
        source: str = CLIENT_IP,
        **kw: Any,
    ) -> Response:
        c = await self.client(vip, port, source)
        try:
            return await c.request(path, **kw)
        finally:
            c.close()


async def _bind_pair(
    factory: Callable[[str], asyncio.Protocol], ips: list[str]
) -> tuple[list[asyncio.AbstractServer], int]:
    """Servers on each ip with one port number (a Service has one targetPort)."""
    loop = asyncio.get_running_loop()
    for _ in range(20):
        first = await loop.create_server(lambda: factory(ips[0]), ips[0], 0)
        port = first.sockets[0].getsockname()[1]
        servers: list[asyncio.AbstractServer] = [first]
        try:
            for ip in ips[1:]:
                servers.append(await loop.create_server(lambda ip=ip: factory(ip), ip, port))  # type: ignore[misc]
            return servers, port
        except OSError:
            for s in servers:
                s.close()
    raise OSError("could not find a port free on every pod address")


@dataclass
class GrpcServer:
    server: Any
    port: int


async def start_grpc(ip: str) -> GrpcServer:
    """A real grpcio server (raw-bytes methods, no protobuf): unary echo, server stream,
    bidi stream, and a method that fails with a status and custom trailers."""
    import grpc  # type: ignore[import-untyped]

    async def unary(req: bytes, ctx: Any) -> bytes:
        ctx.set_trailing_metadata((("x-trailer", "unary"),))
        return b"echo:" + req

    async def server_stream(req: bytes, ctx: Any) -> AsyncIterator[bytes]:
        for i in range(int(req or b"3")):
            yield b"item-%d" % i

    async def bidi(it: AsyncIterator[bytes], ctx: Any) -> AsyncIterator[bytes]:
        async for msg in it:
            yield msg.upper()

    async def fail(req: bytes, ctx: Any) -> bytes:
        ctx.set_trailing_metadata((("x-why", "asked-to-fail"),))
        await ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, "you asked for it")
        return b""

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
    }
    limits = [("grpc.max_receive_message_length", 16 << 20),
              ("grpc.max_send_message_length", 16 << 20)]  # fmt: skip
    server = grpc.aio.server(options=limits)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    port = server.add_insecure_port(f"{ip}:0")
    await server.start()
    return GrpcServer(server, port)


async def start_mesh(tmp_path: Path) -> Mesh:
    ca = CertificateAuthority.init(tmp_path / "ca")
    ids = Identities(ca)
    shared: dict[str, int] = {}  # flaky/reset-once counters span both pods (retries move)
    stats = {"echo-v1": BackendStats(counters=shared), "echo-v2": BackendStats(counters=shared)}
    ip_pod = {"127.0.0.3": "echo-v1", "127.0.0.4": "echo-v2"}
    echo_servers, echo_port = await _bind_pair(
        lambda ip: Backend(ip_pod[ip], stats[ip_pod[ip]], NS), ["127.0.0.3", "127.0.0.4"]
    )
    grpc_srv = await start_grpc("127.0.0.5")
    snap: list[Snapshot] = [Snapshot()]
    n2 = Node("n2", lambda: snap[0], ids, MeshMetrics())
    hbone2 = await serve(
        "127.0.0.2", 0, ids.server_context(n2.identity), InboundHbone(n2), trust_domain=TD
    )
    wp = Waypoint(
        NS,
        "waypoint",
        lambda: snap[0],
        ids,
        node_ports={"n2": hbone2.sockets[0].getsockname()[1]},
    )
    await wp.listen("127.0.0.9", 0)
    base = base_manifest(wp.port, echo_port, grpc_srv.port)
    snap[0] = parse_objects(base)
    n1 = Node(
        "n1", lambda: snap[0], ids, MeshMetrics(), hbone_port=hbone2.sockets[0].getsockname()[1]
    )
    mesh = Mesh(snap, base, n1, n2, wp, echo_port, grpc_srv.port, stats)
    mesh._servers.extend([*echo_servers, hbone2])  # type: ignore[list-item]
    mesh._grpc = grpc_srv  # type: ignore[attr-defined]
    return mesh


async def stop_mesh(mesh: Mesh) -> None:
    await mesh.waypoint.close()
    for s in mesh._servers:
        s.close()
    await mesh._grpc.server.stop(None)  # type: ignore[attr-defined]
    mesh.n1.pool.close()
    for t in (*mesh.n1.tasks, *mesh.n2.tasks):
        t.cancel()
