"""Who may get which SVID, decided by the Kubernetes API server (TokenReview), as Istio does.

A node's ztunnel presents its projected service-account token. The CA asks the API server to
review it (`authentication.k8s.io/v1` TokenReview, with our audience, so a token minted for
some other service cannot be replayed here), then finds the node the token is bound to:

* Kubernetes >= 1.30 puts the node into bound tokens (`authentication.kubernetes.io/node-name`);
* older servers only bind the pod (`.../pod-name`, `.../pod-uid`): the CA reads that pod and
  insists its UID matches, so a token of a deleted-and-recreated pod does not carry over.

The ztunnel may then obtain only its node's own identity and the identities of pods scheduled
on that node (checked live against the API with the `spec.nodeName` and
`spec.serviceAccountName` field selectors, so a pod scheduled a moment ago is already
visible; a cache would race the CNI ADD that triggers the request). A compromised node
therefore cannot mint other nodes' workload identities. Any other service account may obtain
exactly its own workload identity and nothing else.

Every refusal raises `AuthorizationError` with the reason; the CA service turns it into a
denial without leaking more than the reason.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client as k8s

from mesh.identity.spiffe import SpiffeId, node_id, workload_id

log = logging.getLogger("certs.kube_auth")

__all__ = [
    "DEFAULT_AUDIENCE",
    "AuthorizationError",
    "Caller",
    "TokenReviewAuthorizer",
]

DEFAULT_AUDIENCE = "ambientmesh-ca"
_NODE_NAME = "authentication.kubernetes.io/node-name"
_POD_NAME = "authentication.kubernetes.io/pod-name"
_POD_UID = "authentication.kubernetes.io/pod-uid"
_SA_PREFIX = "system:serviceaccount:"


class AuthorizationError(Exception):
    """The caller may not have the identity it asked for (or could not be authenticated)."""


@dataclass(frozen=True)
class Caller:
    """An authenticated caller. `node` is set only for a ztunnel service account."""

    namespace: str
    service_account: str
    node: str | None = None

    @property
    def is_ztunnel(self) -> bool:
        return self.node is not None

    def __str__(self) -> str:
        sa = f"{self.namespace}/{self.service_account}"
        return f"ztunnel {sa} on node {self.node}" if self.node else f"service account {sa}"


def _one(extra: Mapping[str, Any], key: str) -> str | None:
    v = extra.get(key)
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str) and v[0]:
        return v[0]
    return None


class TokenReviewAuthorizer:
    """The CA's `Authorizer` for Kubernetes: `await authorize(token, identity)`."""

    def __init__(
        self,
        api_client: k8s.ApiClient,
        *,
        trust_domain: str,
        ztunnel_service_accounts: Iterable[str] = ("ambientmesh-system/ztunnel",),
        audiences: tuple[str, ...] = (DEFAULT_AUDIENCE,),
        review_ttl: float = 60.0,
        cache_size: int = 4096,
    ) -> None:
        self.core = k8s.CoreV1Api(api_client)
        self.authn = k8s.AuthenticationV1Api(api_client)
        self.trust_domain = trust_domain
        self.ztunnels = frozenset(ztunnel_service_accounts)
        self.audiences = audiences
        self.review_ttl = review_ttl
        self.cache_size = cache_size
        # sha256(token) -> (expiry, Caller): the raw token is never kept.
        self._cache: OrderedDict[bytes, tuple[float, Caller]] = OrderedDict()

    async def authenticate(self, token: str) -> Caller:
        if not token:
            raise AuthorizationError("no bearer token")
        digest = hashlib.sha256(token.encode()).digest()
        hit = self._cache.get(digest)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            self._cache.move_to_end(digest)
            return hit[1]
        caller = await self._review(token)
        self._cache[digest] = (now + self.review_ttl, caller)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return caller

    async def _review(self, token: str) -> Caller:
        body = k8s.V1TokenReview(
            spec=k8s.V1TokenReviewSpec(token=token, audiences=list(self.audiences) or None)
        )
        try:
            review = await self.authn.create_token_review(body)
        except k8s.ApiException as exc:
            raise AuthorizationError(f"TokenReview failed: HTTP {exc.status}") from None
        status = review.status
        if status is None or not status.authenticated or status.user is None:
            reason = getattr(status, "error", None) or "not authenticated"
            raise AuthorizationError(f"token rejected: {reason}")
        if self.audiences and not set(status.audiences or ()) & set(self.audiences):
            raise AuthorizationError("token not issued for this CA's audience")
        username = status.user.username or ""
        if not username.startswith(_SA_PREFIX):
            raise AuthorizationError(f"{username!r} is not a service account")
        ns, _, sa = username[len(_SA_PREFIX) :].partition(":")
        if not ns or not sa:
            raise AuthorizationError(f"malformed service account user {username!r}")
        if f"{ns}/{sa}" not in self.ztunnels:
            return Caller(ns, sa)
        extra = status.user.extra or {}
        node = _one(extra, _NODE_NAME)
        if node is None:
            node = await self._node_of_bound_pod(ns, sa, extra)
        return Caller(ns, sa, node)

    async def _node_of_bound_pod(self, ns: str, sa: str, extra: Mapping[str, Any]) -> str:
        pod_name, pod_uid = _one(extra, _POD_NAME), _one(extra, _POD_UID)
        if pod_name is None or pod_uid is None:
            raise AuthorizationError("ztunnel token is not bound to a pod (use a projected token)")
        try:
            pod = await self.core.read_namespaced_pod(pod_name, ns)
        except k8s.ApiException as exc:
            raise AuthorizationError(f"ztunnel pod {ns}/{pod_name}: HTTP {exc.status}") from None
        if pod.metadata is None or pod.metadata.uid != pod_uid:
            raise AuthorizationError(f"ztunnel pod {ns}/{pod_name} was replaced (uid mismatch)")
        if pod.spec is None or pod.spec.service_account_name != sa or not pod.spec.node_name:
            raise AuthorizationError(f"ztunnel pod {ns}/{pod_name} is not {sa} on a node")
        return str(pod.spec.node_name)

    async def authorize(self, token: str, identity: str) -> Caller:
        """Return the caller when it may obtain `identity`; raise `AuthorizationError` if not."""
        try:
            sid = SpiffeId.parse(identity)
        except ValueError as exc:
            raise AuthorizationError(str(exc)) from None
        if sid.trust_domain != self.trust_domain:
            raise AuthorizationError(f"{identity}: not in trust domain {self.trust_domain}")
        caller = await self.authenticate(token)
        if caller.node is None:
            own = workload_id(self.trust_domain, caller.namespace, caller.service_account)
            if identity != own:
                raise AuthorizationError(
                    f"{caller.namespace}/{caller.service_account} may only obtain {own}"
                )
            return caller
        if identity == node_id(self.trust_domain, caller.node):
            return caller
        if not sid.is_workload:
            raise AuthorizationError(f"{identity}: ztunnel on {caller.node} may not obtain it")
        assert sid.namespace is not None and sid.service_account is not None
        if not await self._runs_on(caller.node, sid.namespace, sid.service_account):
            raise AuthorizationError(
                f"{identity}: no pod of {sid.namespace}/{sid.service_account} on node {caller.node}"
            )
        return caller

    async def _runs_on(self, node: str, ns: str, sa: str) -> bool:
        try:
            pods = await self.core.list_namespaced_pod(
                ns,
                field_selector=f"spec.nodeName={node},spec.serviceAccountName={sa}",
            )
        except k8s.ApiException as exc:
            raise AuthorizationError(f"pod lookup on {node} failed: HTTP {exc.status}") from None
        for pod in pods.items or ():
            phase = pod.status.phase if pod.status is not None else None
            if phase not in ("Succeeded", "Failed"):
                return True
        return False
