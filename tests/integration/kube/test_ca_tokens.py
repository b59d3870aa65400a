"""The CA service authenticating ztunnels by projected service-account token (TokenReview
against the wire-level fake API server), as it runs on Kubernetes: a node with no certificate
yet obtains its own node identity and its pods' identities, nothing else; the token file is
re-read on every request; a client never hands its token to a server that is not the CA."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client as k8s

from certs.ca import CertificateAuthority
from certs.kube_auth import DEFAULT_AUDIENCE, TokenReviewAuthorizer
from certs.service import CaService
from mesh.identity.caclient import CaClient, CaError
from mesh.identity.spiffe import node_id, workload_id
from mesh.tls import server_context
from tests.fakes.kube_apiserver import FakeApiServer, TokenIdentity

TD = "cluster.local"
ZT = "system:serviceaccount:ambientmesh-system:ztunnel"


def pod(ns: str, name: str, node: str, sa: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": []},
        "status": {"phase": "Running"},
    }  # fmt: skip


@dataclass
class Rig:
    ca: CertificateAuthority
    port: int
    token: Path
    apiserver: FakeApiServer

    def client(self) -> CaClient:
        return CaClient(("127.0.0.1", self.port), None, self.ca.bundle_pem, token_file=self.token)


@pytest.fixture
async def rig(
    apiserver: FakeApiServer, api_client: k8s.ApiClient, tmp_path: Path
) -> AsyncIterator[Rig]:
    apiserver.put(pod("shop", "web-1", "node1", "web"))
    apiserver.put(pod("shop", "db-1", "node2", "db"))
    for node in ("node1", "node2"):
        apiserver.tokens[f"zt-{node}"] = TokenIdentity(
            ZT,
            extra={"authentication.kubernetes.io/node-name": [node]},
            audiences=(DEFAULT_AUDIENCE,),
        )
    ca = CertificateAuthority.init(tmp_path / "ca")
    tokens = TokenReviewAuthorizer(api_client, trust_domain=TD)
    server = await CaService(ca, None, tokens=tokens).start("127.0.0.1", 0)
    token = tmp_path / "token"
    token.write_text("zt-node1\n")
    yield Rig(ca, int(server.sockets[0].getsockname()[1]), token, apiserver)
    server.close()


async def test_node_without_certificate_gets_its_node_and_pod_identities(rig: Rig) -> None:
    client = rig.client()
    for identity in (node_id(TD, "node1"), workload_id(TD, "shop", "web")):
        svid = await client.sign(identity)
        assert svid.identity == identity
        rig.ca.verify_leaf(svid.leaf)


async def test_other_nodes_identities_are_refused_and_logged(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    client = rig.client()
    with caplog.at_level(logging.WARNING, "certs.service"):
        for identity in (workload_id(TD, "shop", "db"), node_id(TD, "node2")):
            with pytest.raises(CaError) as err:
                await client.sign(identity)
            assert err.value.status == 403
    assert any("shop/db" in r.message and "node1" in r.message for r in caplog.records)


async def test_bad_or_missing_token_is_refused(rig: Rig) -> None:
    rig.token.write_text("forged")
    with pytest.raises(CaError, match="token rejected") as err:
        await rig.client().sign(workload_id(TD, "shop", "web"))
    assert err.value.status == 403
    rig.token.write_text("")
    with pytest.raises(CaError) as err:
        await rig.client().sign(workload_id(TD, "shop", "web"))
    assert err.value.status == 401


async def test_token_file_is_reread_on_every_request(rig: Rig) -> None:
    client = rig.client()
    await client.sign(workload_id(TD, "shop", "web"))
    rig.token.write_text("zt-node2")  # the kubelet rotated it (here: another node's)
    assert (await client.sign(workload_id(TD, "shop", "db"))).identity.endswith("/sa/db")
    with pytest.raises(CaError):
        await client.sign(workload_id(TD, "shop", "web"))


async def test_token_is_never_sent_to_a_server_that_is_not_the_ca(rig: Rig, tmp_path: Path) -> None:
    """Any mesh certificate chains to the bundle; only the CA's identity may get the token."""
    got: list[bytes] = []

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(await reader.read(4096))
        writer.close()

    ctx = server_context(rig.ca.issue(node_id(TD, "node2")), rig.ca.bundle_pem)
    srv = await asyncio.start_server(impostor, "127.0.0.1", 0, ssl=ctx)
    client = CaClient(
        ("127.0.0.1", srv.sockets[0].getsockname()[1]), None, rig.ca.bundle_pem,
        token_file=rig.token,
    )  # fmt: skip
    try:
        with pytest.raises(CaError, match="is not the CA"):
            await client.sign(workload_id(TD, "shop", "web"))
        await asyncio.sleep(0.1)
        assert not any(b"zt-node1" in g for g in got)
    finally:
        srv.close()


async def test_nobody_gets_the_cas_own_identity(rig: Rig) -> None:
    """A node named "ca" would otherwise be allowed its node identity, which is the CA's."""
    rig.apiserver.tokens["zt-ca"] = TokenIdentity(
        ZT, extra={"authentication.kubernetes.io/node-name": ["ca"]},
        audiences=(DEFAULT_AUDIENCE,),
    )  # fmt: skip
    rig.token.write_text("zt-ca")
    with pytest.raises(CaError, match="CA's own identity") as err:
        await rig.client().sign(node_id(TD, "ca"))
    assert err.value.status == 403
