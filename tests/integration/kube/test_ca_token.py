"""The CA service in Kubernetes mode, on the wire: a ztunnel with no certificate connects with
server-only TLS, presents its projected token, the CA asks the (fake) API server to review it
and to say which pods run on the token's node. Real TLS, real HTTP, real kubernetes_asyncio."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fake_apiserver import FakeApiServer, TokenIdentity
from kubernetes_asyncio import client as k8s

from certs.ca import CertificateAuthority
from certs.kube_auth import DEFAULT_AUDIENCE, AuthorizationError, TokenReviewAuthorizer
from certs.service import CaClient, CaError, CaService, ca_identity
from certs.spiffe import node_id, workload_id
from mesh.tls import server_context

TD = "cluster.local"
ZT = "system:serviceaccount:ambientmesh-system:ztunnel"
WEB = workload_id(TD, "shop", "web")  # runs on node1
DB = workload_id(TD, "shop", "db")  # runs on node2


def pod(ns: str, name: str, node: str, sa: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": []},
        "status": {"phase": "Running", "podIP": "10.244.1.5"},
    }


def zt_token(node: str, audience: str = DEFAULT_AUDIENCE) -> TokenIdentity:
    return TokenIdentity(
        ZT, extra={"authentication.kubernetes.io/node-name": [node]}, audiences=(audience,)
    )


@dataclass
class Ca:
    ca: CertificateAuthority
    port: int
    service: CaService
    tmp: Path

    def client(self, token: str) -> CaClient:
        path = self.tmp / f"token-{token}"
        path.write_text(token + "\n")
        return CaClient(("127.0.0.1", self.port), None, self.ca.bundle_pem,
                        token_file=path, trust_domain=TD)  # fmt: skip


@pytest.fixture
async def ca(
    apiserver: FakeApiServer, api_client: k8s.ApiClient, tmp_path: Path
) -> AsyncIterator[Ca]:
    apiserver.put(pod("shop", "web-1", "node1", "web"))
    apiserver.put(pod("shop", "db-1", "node2", "db"))
    apiserver.tokens["node1"] = zt_token("node1")
    apiserver.tokens["node2"] = zt_token("node2")
    apiserver.tokens["node1-apiserver-audience"] = zt_token(
        "node1", "https://kubernetes.default.svc"
    )
    authority = CertificateAuthority.init(tmp_path / "ca")
    authz = TokenReviewAuthorizer(api_client, trust_domain=TD)
    service = CaService(authority, authz, auth_errors=(AuthorizationError,))
    server = await service.start("127.0.0.1", 0)
    try:
        yield Ca(authority, server.sockets[0].getsockname()[1], service, tmp_path)
    finally:
        server.close()


async def test_ztunnel_token_gets_svid_of_pod_on_its_node(ca: Ca) -> None:
    client = ca.client("node1")
    svid = await client.sign(WEB, timedelta(hours=1))
    assert svid.identity == WEB
    ca.ca.verify_leaf(svid.leaf)
    node = await client.sign(node_id(TD, "node1"))  # its node identity, for its :15008
    assert node.identity == node_id(TD, "node1")


@pytest.mark.parametrize(
    ("token", "identity", "status", "reason"),
    [
        ("node2", WEB, 403, "no pod of shop/web on node node2"),  # another node's token
        ("node1", DB, 403, "no pod of shop/db on node node1"),  # a pod on another node
        ("node1", node_id(TD, "node2"), 403, "may not obtain"),  # another node's identity
        ("forged", WEB, 403, "token rejected"),  # a token the API server does not know
        ("node1-apiserver-audience", WEB, 403, "token rejected"),  # minted for someone else
        ("node1", ca_identity(TD), 403, "reserved for the CA"),  # posing as the CA
    ],
)
async def test_refusals_are_refused_and_logged(
    ca: Ca, caplog: pytest.LogCaptureFixture, token: str, identity: str, status: int, reason: str
) -> None:
    with caplog.at_level(logging.WARNING, "certs.service"), pytest.raises(CaError) as err:
        await ca.client(token).sign(identity)
    assert err.value.status == status
    assert reason in str(err.value)
    assert any(identity in r.message and reason in r.message for r in caplog.records)


async def test_no_token_is_401_and_garbage_never_stops_the_ca(ca: Ca) -> None:
    ctx = ssl.create_default_context(cafile=None)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=ca.ca.bundle_pem.decode())
    ctx.set_alpn_protocols(["http/1.1"])
    csr_req = ca.client("node1")
    # a well-formed request, minus the token
    body = b'{"csr": "x"}'
    junk = [
        b"POST /v1/sign HTTP/1.1\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body),
        b"POST /v1/sign HTTP/1.1\r\ncontent-length: 5\r\n\r\n{{{{{",
        b"POST /v1/sign HTTP/1.1\r\ncontent-length: nope\r\n\r\n",
        b"\x00\xff\r\n\r\n",
        b"GET /v1/sign HTTP/1.1\r\n\r\n",
    ]
    answers = []
    for data in junk:
        r, w = await asyncio.open_connection("127.0.0.1", ca.port, ssl=ctx, server_hostname="ca")
        w.write(data)
        answers.append((await r.read(-1)).split(b"\r\n", 1)[0])
        w.close()
    assert answers == [
        b"HTTP/1.1 400 Bad Request",  # the CSR is checked before the caller
        b"HTTP/1.1 400 Bad Request",
        b"HTTP/1.1 400 Bad Request",
        b"HTTP/1.1 400 Bad Request",
        b"HTTP/1.1 404 Not Found",
    ]
    # not TLS at all, and a TLS handshake cut short
    r, w = await asyncio.open_connection("127.0.0.1", ca.port)
    w.write(b"GET / HTTP/1.1\r\n\r\n")
    await r.read(-1)
    w.close()
    # a real CSR with no token at all: 401
    no_token = CaClient(("127.0.0.1", ca.port), None, ca.ca.bundle_pem,
                        token_file=ca.tmp / "token-node1", trust_domain=TD)  # fmt: skip
    no_token.token_file = None
    with pytest.raises(CaError) as err:
        await no_token.sign(WEB)
    assert err.value.status == 401
    assert (await csr_req.sign(WEB)).identity == WEB  # still serving


async def test_token_file_is_reread_on_every_request(ca: Ca) -> None:
    """Projected tokens rotate: the client must send what is in the file now."""
    client = ca.client("node1")
    assert (await client.sign(WEB)).identity == WEB
    assert client.token_file is not None
    client.token_file.write_text("node2")  # the kubelet swapped the file
    with pytest.raises(CaError, match="no pod of shop/web on node node2"):
        await client.sign(WEB)
    client.token_file.unlink()
    with pytest.raises(CaError, match="token file"):
        await client.sign(WEB)


async def test_client_sends_its_token_only_to_the_ca(ca: Ca, tmp_path: Path) -> None:
    """A mesh member with a valid certificate of its own (here: a node's) is not the CA: the
    client must hang up before the token leaves."""
    received = bytearray()

    async def impostor(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        received.extend(await r.read(-1))
        w.close()

    ctx = server_context(ca.ca.issue(node_id(TD, "node2")), ca.ca.bundle_pem)
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    srv = await asyncio.start_server(impostor, "127.0.0.1", 0, ssl=ctx)
    try:
        port = srv.sockets[0].getsockname()[1]
        (tmp_path / "tok").write_text("node1")
        client = CaClient(("127.0.0.1", port), None, ca.ca.bundle_pem,
                          token_file=tmp_path / "tok", trust_domain=TD)  # fmt: skip
        with pytest.raises(CaError, match="is not the CA"):
            await client.sign(WEB)
        await asyncio.sleep(0.1)
        assert b"node1" not in received
    finally:
        srv.close()
