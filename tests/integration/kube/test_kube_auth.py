"""The CA's TokenReview authorizer against the fake API server: a node's ztunnel gets the
identities of pods on its node and nothing else."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes_asyncio import client as k8s

from certs.kube_auth import DEFAULT_AUDIENCE, AuthorizationError, TokenReviewAuthorizer
from mesh.identity.spiffe import node_id, workload_id
from tests.fakes.kube_apiserver import FakeApiServer, TokenIdentity

TD = "cluster.local"
ZT = "system:serviceaccount:ambientmesh-system:ztunnel"


def pod(ns: str, name: str, node: str, sa: str, phase: str = "Running") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": []},
        "status": {"phase": phase},
    }


@pytest.fixture
def cluster(apiserver: FakeApiServer) -> FakeApiServer:
    apiserver.put(pod("shop", "web-1", "node1", "web"))
    apiserver.put(pod("shop", "db-1", "node2", "db"))
    apiserver.put(pod("shop", "batch-1", "node1", "batch", phase="Succeeded"))
    zt1 = apiserver.put(pod("ambientmesh-system", "ztunnel-a", "node1", "ztunnel"))
    apiserver.tokens["zt-node1"] = TokenIdentity(
        ZT,
        extra={"authentication.kubernetes.io/node-name": ["node1"]},
        audiences=(DEFAULT_AUDIENCE,),
    )
    # An older API server: only the pod is bound into the token.
    apiserver.tokens["zt-node1-podbound"] = TokenIdentity(
        ZT,
        extra={
            "authentication.kubernetes.io/pod-name": ["ztunnel-a"],
            "authentication.kubernetes.io/pod-uid": [zt1["metadata"]["uid"]],
        },
        audiences=(DEFAULT_AUDIENCE,),
    )
    apiserver.tokens["zt-stale-pod"] = TokenIdentity(
        ZT,
        extra={
            "authentication.kubernetes.io/pod-name": ["ztunnel-a"],
            "authentication.kubernetes.io/pod-uid": ["an-older-uid"],
        },
        audiences=(DEFAULT_AUDIENCE,),
    )
    apiserver.tokens["zt-unbound"] = TokenIdentity(ZT, audiences=(DEFAULT_AUDIENCE,))
    apiserver.tokens["web"] = TokenIdentity(
        "system:serviceaccount:shop:web", audiences=(DEFAULT_AUDIENCE,)
    )
    apiserver.tokens["zt-other-audience"] = TokenIdentity(
        ZT,
        extra={"authentication.kubernetes.io/node-name": ["node1"]},
        audiences=("https://kubernetes.default.svc",),
    )
    return apiserver


@pytest.fixture
def authz(cluster: FakeApiServer, api_client: k8s.ApiClient) -> TokenReviewAuthorizer:
    return TokenReviewAuthorizer(api_client, trust_domain=TD)


@pytest.mark.parametrize("token", ["zt-node1", "zt-node1-podbound"])
async def test_ztunnel_gets_identities_of_pods_on_its_node_only(
    authz: TokenReviewAuthorizer, token: str
) -> None:
    caller = await authz.authorize(token, workload_id(TD, "shop", "web"))
    assert caller.node == "node1"
    assert (await authz.authorize(token, node_id(TD, "node1"))).node == "node1"
    with pytest.raises(AuthorizationError, match="no pod of shop/db on node node1"):
        await authz.authorize(token, workload_id(TD, "shop", "db"))  # db runs on node2
    with pytest.raises(AuthorizationError, match="may not obtain"):
        await authz.authorize(token, node_id(TD, "node2"))
    with pytest.raises(AuthorizationError, match="no pod of shop/batch"):
        await authz.authorize(token, workload_id(TD, "shop", "batch"))  # finished pod
    with pytest.raises(AuthorizationError, match="trust domain"):
        await authz.authorize(token, workload_id("evil.example", "shop", "web"))


async def test_pod_scheduled_now_is_visible_at_once(
    authz: TokenReviewAuthorizer, cluster: FakeApiServer
) -> None:
    ident = workload_id(TD, "shop", "api")
    with pytest.raises(AuthorizationError):
        await authz.authorize("zt-node1", ident)
    cluster.put(pod("shop", "api-1", "node1", "api"))
    assert (await authz.authorize("zt-node1", ident)).node == "node1"


async def test_refusals(authz: TokenReviewAuthorizer) -> None:
    web = workload_id(TD, "shop", "web")
    with pytest.raises(AuthorizationError, match="token rejected"):
        await authz.authorize("forged", web)
    with pytest.raises(AuthorizationError, match="uid mismatch"):
        await authz.authorize("zt-stale-pod", web)
    with pytest.raises(AuthorizationError, match="not bound to a pod"):
        await authz.authorize("zt-unbound", web)
    with pytest.raises(AuthorizationError, match="token rejected"):
        await authz.authorize("zt-other-audience", web)
    with pytest.raises(AuthorizationError, match="no bearer token"):
        await authz.authorize("", web)


async def test_workload_token_gets_only_its_own_identity(authz: TokenReviewAuthorizer) -> None:
    caller = await authz.authorize("web", workload_id(TD, "shop", "web"))
    assert caller.node is None and caller.service_account == "web"
    with pytest.raises(AuthorizationError, match="may only obtain"):
        await authz.authorize("web", workload_id(TD, "shop", "db"))
    with pytest.raises(AuthorizationError, match="may only obtain"):
        await authz.authorize("web", node_id(TD, "node1"))


async def test_reviews_are_cached(authz: TokenReviewAuthorizer, cluster: FakeApiServer) -> None:
    for _ in range(3):
        await authz.authorize("zt-node1", workload_id(TD, "shop", "web"))
    reviews = [p for m, p in cluster.requests if p.endswith("/tokenreviews")]
    assert len(reviews) == 1
