"""The mesh's configuration as immutable data.

Every source (YAML files for the lab, a Kubernetes watch) produces the same `Snapshot`: the
proxies never see raw objects, so validation happens once, in `mesh.config.parse`, and a bad
object never reaches the data path. Snapshots are swapped whole, never mutated (DESIGN.md §3).

Mappings in these frozen dataclasses are `types.MappingProxyType` views over private dicts, so
a holder cannot mutate a snapshot behind another holder's back.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from mesh.ports import HBONE_PORT

EMPTY_LABELS: Mapping[str, str] = MappingProxyType({})


def _no_labels() -> Mapping[str, str]:
    return EMPTY_LABELS


# Well-known labels, spelled as Istio spells them so users' manifests carry over.
DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
DATAPLANE_MODE_AMBIENT = "ambient"
DATAPLANE_MODE_NONE = "none"
USE_WAYPOINT_LABEL = "istio.io/use-waypoint"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
WAYPOINT_GATEWAY_CLASS = "waypoint"
DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_ROOT_NAMESPACE = "istio-system"


class ConfigError(ValueError):
    """A configuration object is invalid.

    The message always names the object and the field, e.g.
    ``HTTPRoute default/reviews: spec.rules[0].backendRefs[1].weight must be >= 0``,
    because the operator reading it has to find the line in a manifest.
    """

    def __init__(self, obj: str, field_path: str, problem: str) -> None:
        self.obj = obj
        self.field_path = field_path
        self.problem = problem
        where = f"{field_path} " if field_path else ""
        super().__init__(f"{obj}: {where}{problem}")


@dataclass(frozen=True, slots=True)
class Node:
    """A node: where a ztunnel runs. `address` is where its HBONE listener (:15008) is reached."""

    name: str
    address: str | None = None


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=_no_labels)


@dataclass(frozen=True, slots=True)
class Pod:
    namespace: str
    name: str
    ip: str | None
    node: str | None
    service_account: str = "default"
    labels: Mapping[str, str] = field(default_factory=_no_labels)
    ready: bool = True
    # The lab runs this command inside the pod's netns and cgroup; Kubernetes ignores it.
    command: tuple[str, ...] = ()
    uid: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def identity(self, trust_domain: str) -> str:
        return f"spiffe://{trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    target_port: int | str  # a number, or the name of a container port
    name: str = ""
    protocol: str = "TCP"
    app_protocol: str = ""


@dataclass(frozen=True, slots=True)
class Service:
    namespace: str
    name: str
    cluster_ip: str | None
    ports: tuple[ServicePort, ...]
    selector: Mapping[str, str] = field(default_factory=_no_labels)
    labels: Mapping[str, str] = field(default_factory=_no_labels)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One ready backend of a service port: the pod and the port its app listens on."""

    pod: Pod
    port: int


@dataclass(frozen=True, slots=True)
class Waypoint:
    """A Gateway of class `waypoint`. Its pods carry `gateway.networking.k8s.io/gateway-name`."""

    namespace: str
    name: str
    port: int = HBONE_PORT

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# ---------------------------------------------------------------------------------------------
# Gateway API HTTPRoute (v1), mesh profile: parentRefs point at Services.


class PathMatchType(enum.Enum):
    EXACT = "Exact"
    PATH_PREFIX = "PathPrefix"
    REGULAR_EXPRESSION = "RegularExpression"


class ValueMatchType(enum.Enum):
    EXACT = "Exact"
    REGULAR_EXPRESSION = "RegularExpression"


@dataclass(frozen=True, slots=True)
class PathMatch:
    type: PathMatchType = PathMatchType.PATH_PREFIX
    value: str = "/"


@dataclass(frozen=True, slots=True)
class ValueMatch:
    """A header or query-parameter match. Header names are compared case-insensitively."""

    name: str
    value: str
    type: ValueMatchType = ValueMatchType.EXACT


@dataclass(frozen=True, slots=True)
class GRPCMethodMatch:
    """A GRPCRoute method match as written. Routing uses the path match compiled from it; this
    is kept for the spec's precedence (exact service, then exact method characters) and dumps."""

    type: ValueMatchType = ValueMatchType.EXACT
    service: str | None = None
    method: str | None = None


@dataclass(frozen=True, slots=True)
class RouteMatch:
    path: PathMatch | None = PathMatch()
    headers: tuple[ValueMatch, ...] = ()
    query_params: tuple[ValueMatch, ...] = ()
    method: str | None = None
    grpc_method: GRPCMethodMatch | None = None  # GRPCRoute only: what `path` was compiled from


@dataclass(frozen=True, slots=True)
class HeaderModifier:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


class PathModifierType(enum.Enum):
    REPLACE_FULL_PATH = "ReplaceFullPath"
    REPLACE_PREFIX_MATCH = "ReplacePrefixMatch"


@dataclass(frozen=True, slots=True)
class PathModifier:
    type: PathModifierType
    value: str


@dataclass(frozen=True, slots=True)
class RequestRedirect:
    scheme: str | None = None
    hostname: str | None = None
    path: PathModifier | None = None
    port: int | None = None
    status_code: int = 302


@dataclass(frozen=True, slots=True)
class URLRewrite:
    hostname: str | None = None
    path: PathModifier | None = None


@dataclass(frozen=True, slots=True)
class BackendRef:
    """A Service backend. `namespace` defaults to the route's own namespace."""

    name: str
    namespace: str
    port: int | None
    weight: int = 1
    filters: tuple[RouteFilter, ...] = ()


@dataclass(frozen=True, slots=True)
class RequestMirror:
    backend: BackendRef


class FilterType(enum.Enum):
    REQUEST_HEADER_MODIFIER = "RequestHeaderModifier"
    RESPONSE_HEADER_MODIFIER = "ResponseHeaderModifier"
    REQUEST_REDIRECT = "RequestRedirect"
    URL_REWRITE = "URLRewrite"
    REQUEST_MIRROR = "RequestMirror"


@dataclass(frozen=True, slots=True)
class RouteFilter:
    type: FilterType
    request_header_modifier: HeaderModifier | None = None
    response_header_modifier: HeaderModifier | None = None
    request_redirect: RequestRedirect | None = None
    url_rewrite: URLRewrite | None = None
    request_mirror: RequestMirror | None = None


@dataclass(frozen=True, slots=True)
class RouteTimeouts:
    request: float | None = None  # seconds; None = no timeout
    backend_request: float | None = None


@dataclass(frozen=True, slots=True)
class RouteRetry:
    attempts: int = 0  # retries after the first try
    codes: tuple[int, ...] = ()
    backoff: float = 0.025  # seconds
    # GRPCRoute: gRPC status codes (0-16) that make an attempt worth retrying. Seen in a
    # trailers-only answer's head, the only place known before anything is forwarded.
    grpc_codes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class RouteRule:
    matches: tuple[RouteMatch, ...] = (RouteMatch(),)
    filters: tuple[RouteFilter, ...] = ()
    backend_refs: tuple[BackendRef, ...] = ()
    timeouts: RouteTimeouts = RouteTimeouts()
    retry: RouteRetry = RouteRetry()
    name: str = ""


@dataclass(frozen=True, slots=True)
class ParentRef:
    kind: str  # "Service" (mesh profile) or "Gateway"
    name: str
    namespace: str
    port: int | None = None
    group: str = ""


@dataclass(frozen=True, slots=True)
class HTTPRoute:
    """An HTTPRoute, or a GRPCRoute compiled into the same model (`kind` says which).

    A gRPC call is an HTTP/2 POST to /<service>/<method>, so a GRPCRoute's method match is a
    path match and everything else (headers, filters, weights, mirrors) is HTTPRoute's: one
    routing engine serves both, and a GRPCRoute only ever matches gRPC requests."""

    namespace: str
    name: str
    parent_refs: tuple[ParentRef, ...]
    hostnames: tuple[str, ...] = ()
    rules: tuple[RouteRule, ...] = ()
    # Creation order breaks ties in the spec's precedence rules (oldest first, then name).
    creation_timestamp: str = ""
    kind: str = "HTTPRoute"  # or "GRPCRoute"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# ---------------------------------------------------------------------------------------------
# Istio security: AuthorizationPolicy and PeerAuthentication (security.istio.io/v1).


class PolicyAction(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"  # marks matching requests audited; never changes the decision


@dataclass(frozen=True, slots=True)
class PolicySource:
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()  # L7: "iss/sub" of a verified JWT
    not_request_principals: tuple[str, ...] = ()

    @property
    def has_l7(self) -> bool:
        return bool(self.request_principals or self.not_request_principals)


# `when` keys a ztunnel can evaluate (they describe the connection, not a request).
L4_CONDITION_KEYS = frozenset(
    ["source.ip", "source.namespace", "source.principal", "destination.port"]
)


@dataclass(frozen=True, slots=True)
class PolicyCondition:
    """One `when` entry. `key` as written (`request.headers[x-foo]`,
    `request.auth.claims[groups]`); `path` is the bracketed part split out
    (`("x-foo",)`, `("groups",)`, `("a", "b")` for nested claims)."""

    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()
    path: tuple[str, ...] = ()

    @property
    def attribute(self) -> str:
        """The key without its brackets: `request.headers`, `request.auth.claims`, ..."""
        return self.key.split("[", 1)[0]

    @property
    def has_l7(self) -> bool:
        return self.attribute not in L4_CONDITION_KEYS


@dataclass(frozen=True, slots=True)
class PolicyOperation:
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    methods: tuple[str, ...] = ()  # L7: only a waypoint can evaluate these
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()  # L7
    not_paths: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()  # L7
    not_hosts: tuple[str, ...] = ()

    @property
    def has_l7(self) -> bool:
        return bool(
            self.methods
            or self.not_methods
            or self.paths
            or self.not_paths
            or self.hosts
            or self.not_hosts
        )


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """`from` entries are ORed, `to` entries are ORed, and the two are ANDed (Istio's rules).

    An empty `sources` or `operations` matches anything.
    """

    sources: tuple[PolicySource, ...] = ()
    operations: tuple[PolicyOperation, ...] = ()
    conditions: tuple[PolicyCondition, ...] = ()  # `when`: all must hold

    @property
    def has_l7(self) -> bool:
        return (
            any(o.has_l7 for o in self.operations)
            or any(s.has_l7 for s in self.sources)
            or any(c.has_l7 for c in self.conditions)
        )


@dataclass(frozen=True, slots=True)
class PolicyTargetRef:
    kind: str  # "Gateway", "Service", or "GatewayClass" (root namespace: every waypoint)
    name: str
    group: str = ""


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    """Applies to the pods its selector matches in its namespace (all pods when no selector; the
    whole mesh when in the root namespace), or, with target_refs, to a waypoint or a service
    at the waypoint. An ALLOW policy with no rules allows nothing."""

    namespace: str
    name: str
    action: PolicyAction
    rules: tuple[PolicyRule, ...] = ()
    selector: Mapping[str, str] | None = None
    target_refs: tuple[PolicyTargetRef, ...] = ()
    # Annotation `istio.io/dry-run: "true"`: evaluated and logged as a shadow result, never
    # enforced (Istio's dry run).
    dry_run: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class JwtHeader:
    """Where a token may be: a header, and the prefix before the token (`Bearer `)."""

    name: str
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class JwtRule:
    """One issuer of a RequestAuthentication. Exactly one of `jwks` (the JWKS JSON itself)
    and `jwks_uri` (`file:///path`, or `configmap://<ns>/<name>/<key>` for a ConfigMap in
    the snapshot) is set. No `from_headers`/`from_params` means Istio's defaults: the
    `Authorization: Bearer` header and the `access_token` query parameter."""

    issuer: str
    audiences: tuple[str, ...] = ()
    jwks: str | None = None
    jwks_uri: str | None = None
    from_headers: tuple[JwtHeader, ...] = ()
    from_params: tuple[str, ...] = ()
    forward_original_token: bool = False
    output_payload_to_header: str | None = None


@dataclass(frozen=True, slots=True)
class RequestAuthentication:
    """JWT verification at the waypoint (security.istio.io/v1). Bound like an
    AuthorizationPolicy: targetRefs to the waypoint Gateway, a Service, or (root namespace)
    the `waypoint` GatewayClass. A selector-bound one would be ztunnel's, which cannot read
    HTTP: it is kept for analysis and enforced nowhere."""

    namespace: str
    name: str
    rules: tuple[JwtRule, ...] = ()
    selector: Mapping[str, str] | None = None
    target_refs: tuple[PolicyTargetRef, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ConfigMap:
    """Only its string `data`: what a RequestAuthentication's JWKS may be read from."""

    namespace: str
    name: str
    data: Mapping[str, str] = field(default_factory=_no_labels)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class MtlsMode(enum.Enum):
    UNSET = "UNSET"
    PERMISSIVE = "PERMISSIVE"
    STRICT = "STRICT"
    DISABLE = "DISABLE"


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    namespace: str
    name: str
    mode: MtlsMode = MtlsMode.UNSET
    selector: Mapping[str, str] | None = None
    port_modes: Mapping[int, MtlsMode] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# ---------------------------------------------------------------------------------------------
# Kubernetes NetworkPolicy (networking.k8s.io/v1) and the subset of Cilium's
# CiliumNetworkPolicy (cilium.io/v2) that users bring from the article's examples.
# Both kinds only allow: a policy selecting a pod makes that pod default-deny in each direction
# the policy covers, and every rule is a hole in that wall.


@dataclass(frozen=True, slots=True)
class NetworkPolicyPort:
    """A port (None: every port) of one protocol. Only TCP is carried by the mesh."""

    port: int | None = None
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class NetworkPolicyPeer:
    """One `from`/`to` entry. A selector left out is None (it does not narrow); an empty
    selector `{}` matches everything in its scope, as Kubernetes says."""

    pod_selector: Mapping[str, str] | None = None
    namespace_selector: Mapping[str, str] | None = None
    ip_block: str | None = None
    ip_block_except: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NetworkPolicyRule:
    """An empty `peers` matches every peer; an empty `ports` matches every port."""

    peers: tuple[NetworkPolicyPeer, ...] = ()
    ports: tuple[NetworkPolicyPort, ...] = ()


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    namespace: str
    name: str
    pod_selector: Mapping[str, str] = field(default_factory=_no_labels)
    policy_types: tuple[str, ...] = ("Ingress",)  # "Ingress" and/or "Egress"
    ingress: tuple[NetworkPolicyRule, ...] = ()
    egress: tuple[NetworkPolicyRule, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class CiliumHTTPRule:
    """An L7 rule: only a waypoint can evaluate it. `method` and `path` are regular
    expressions matched against the whole method and path (Cilium's meaning); None matches
    any."""

    method: str | None = None
    path: str | None = None


@dataclass(frozen=True, slots=True)
class CiliumPortRule:
    """`toPorts` entry: TCP ports (empty: any port) and optional HTTP rules on them."""

    ports: tuple[int, ...] = ()
    http: tuple[CiliumHTTPRule, ...] = ()


class CiliumEntity(enum.Enum):
    WORLD = "world"


@dataclass(frozen=True, slots=True)
class CiliumRule:
    """One ingress or egress rule. `endpoints` selectors (fromEndpoints/toEndpoints) are ORed
    with `entities` and `cidrs`; with none of the three the rule matches every peer.
    `auth_required` is `authentication: {mode: required}`: the peer must come over mTLS."""

    endpoints: tuple[Mapping[str, str], ...] = ()
    entities: tuple[CiliumEntity, ...] = ()
    cidrs: tuple[str, ...] = ()
    to_ports: tuple[CiliumPortRule, ...] = ()
    auth_required: bool = False

    @property
    def has_l7(self) -> bool:
        return any(p.http for p in self.to_ports)


@dataclass(frozen=True, slots=True)
class CiliumNetworkPolicy:
    """`ingress`/`egress` None when the section is absent: that direction stays open. A
    section present (even empty) makes the selected endpoints default-deny that way."""

    namespace: str
    name: str
    endpoint_selector: Mapping[str, str] = field(default_factory=_no_labels)
    ingress: tuple[CiliumRule, ...] | None = None
    egress: tuple[CiliumRule, ...] | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def has_l7(self) -> bool:
        return any(r.has_l7 for r in (self.ingress or ()) + (self.egress or ()))
