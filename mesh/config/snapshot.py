"""One immutable view of mesh state with the lookup tables the data path needs.

The tables are built once per snapshot, so a per-connection lookup is a dict access, never a
scan (DESIGN.md §7). Nothing here parses or validates: `mesh.config.parse` does, and hands this
class only objects that passed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from mesh.config.model import (
    DATAPLANE_MODE_AMBIENT,
    DATAPLANE_MODE_LABEL,
    DATAPLANE_MODE_NONE,
    DEFAULT_ROOT_NAMESPACE,
    DEFAULT_TRUST_DOMAIN,
    GATEWAY_NAME_LABEL,
    USE_WAYPOINT_LABEL,
    AuthorizationPolicy,
    CiliumNetworkPolicy,
    ConfigMap,
    Endpoint,
    HTTPRoute,
    MtlsMode,
    Namespace,
    NetworkPolicy,
    Node,
    PeerAuthentication,
    Pod,
    RequestAuthentication,
    Service,
    ServicePort,
    Waypoint,
)


def selector_matches(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    """A Kubernetes matchLabels selector; None (no selector) matches everything."""
    if selector is None:
        return True
    return all(labels.get(k) == v for k, v in selector.items())


@dataclass(frozen=True, slots=True)
class PolicySet:
    """The AuthorizationPolicies that apply to one workload, split by action. Dry-run
    policies are in their action's tuple too; the evaluator keeps them from deciding."""

    allow: tuple[AuthorizationPolicy, ...] = ()
    deny: tuple[AuthorizationPolicy, ...] = ()
    audit: tuple[AuthorizationPolicy, ...] = ()


NO_POLICIES = PolicySet()


@dataclass(frozen=True)
class Snapshot:
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    nodes: tuple[Node, ...] = ()
    namespaces: tuple[Namespace, ...] = ()
    pods: tuple[Pod, ...] = ()
    services: tuple[Service, ...] = ()
    waypoints: tuple[Waypoint, ...] = ()
    http_routes: tuple[HTTPRoute, ...] = ()
    authorization_policies: tuple[AuthorizationPolicy, ...] = ()
    peer_authentications: tuple[PeerAuthentication, ...] = ()
    network_policies: tuple[NetworkPolicy, ...] = ()
    cilium_policies: tuple[CiliumNetworkPolicy, ...] = ()
    request_authentications: tuple[RequestAuthentication, ...] = ()
    config_maps: tuple[ConfigMap, ...] = ()
    # A monotonically increasing number, so logs and the config dump can say which one served.
    version: int = 0

    # Lookup tables, derived in __post_init__.
    _node_by_name: Mapping[str, Node] = field(init=False, repr=False, compare=False)
    _ns_by_name: Mapping[str, Namespace] = field(init=False, repr=False, compare=False)
    _pod_by_ip: Mapping[str, Pod] = field(init=False, repr=False, compare=False)
    _pod_by_key: Mapping[str, Pod] = field(init=False, repr=False, compare=False)
    _svc_by_vip_port: Mapping[tuple[str, int], tuple[Service, ServicePort]] = field(
        init=False, repr=False, compare=False
    )
    _svc_by_key: Mapping[str, Service] = field(init=False, repr=False, compare=False)
    _endpoints: Mapping[tuple[str, int], tuple[Endpoint, ...]] = field(
        init=False, repr=False, compare=False
    )
    _waypoint_by_key: Mapping[str, Waypoint] = field(init=False, repr=False, compare=False)
    _waypoint_pods: Mapping[str, tuple[Pod, ...]] = field(init=False, repr=False, compare=False)
    _routes_by_service: Mapping[str, tuple[HTTPRoute, ...]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        s = object.__setattr__
        s(self, "_node_by_name", MappingProxyType({n.name: n for n in self.nodes}))
        s(self, "_ns_by_name", MappingProxyType({n.name: n for n in self.namespaces}))
        s(self, "_pod_by_ip", MappingProxyType({p.ip: p for p in self.pods if p.ip}))
        s(self, "_pod_by_key", MappingProxyType({p.key: p for p in self.pods}))
        by_vip: dict[tuple[str, int], tuple[Service, ServicePort]] = {}
        endpoints: dict[tuple[str, int], tuple[Endpoint, ...]] = {}
        for svc in self.services:
            members = [
                p
                for p in self.pods
                if p.namespace == svc.namespace
                and p.ip
                and p.ready
                and svc.selector
                and selector_matches(svc.selector, p.labels)
            ]
            for sp in svc.ports:
                if svc.cluster_ip:
                    by_vip[(svc.cluster_ip, sp.port)] = (svc, sp)
                # Named target ports need container ports we do not model: the name falls back
                # to the service port, which is what a pod without that name would get too.
                target = sp.target_port if isinstance(sp.target_port, int) else sp.port
                endpoints[(svc.key, sp.port)] = tuple(Endpoint(p, target) for p in members)
        s(self, "_svc_by_vip_port", MappingProxyType(by_vip))
        s(self, "_svc_by_key", MappingProxyType({svc.key: svc for svc in self.services}))
        s(self, "_endpoints", MappingProxyType(endpoints))
        s(self, "_waypoint_by_key", MappingProxyType({w.key: w for w in self.waypoints}))
        wp_pods: dict[str, tuple[Pod, ...]] = {}
        for w in self.waypoints:
            wp_pods[w.key] = tuple(
                p
                for p in self.pods
                if p.namespace == w.namespace
                and p.ip
                and p.ready
                and p.labels.get(GATEWAY_NAME_LABEL) == w.name
            )
        s(self, "_waypoint_pods", MappingProxyType(wp_pods))
        routes: dict[str, list[HTTPRoute]] = {}
        for r in self.http_routes:
            for ref in r.parent_refs:
                if ref.kind == "Service":
                    routes.setdefault(f"{ref.namespace}/{ref.name}", []).append(r)
        s(
            self,
            "_routes_by_service",
            MappingProxyType({k: tuple(v) for k, v in routes.items()}),
        )

    # -- workloads -------------------------------------------------------------------------

    def node(self, name: str) -> Node | None:
        return self._node_by_name.get(name)

    def namespace(self, name: str) -> Namespace | None:
        return self._ns_by_name.get(name)

    def pod_by_ip(self, ip: str) -> Pod | None:
        return self._pod_by_ip.get(ip)

    def pod(self, namespace: str, name: str) -> Pod | None:
        return self._pod_by_key.get(f"{namespace}/{name}")

    def pods_on_node(self, node: str) -> tuple[Pod, ...]:
        return tuple(p for p in self.pods if p.node == node)

    def is_ambient(self, pod: Pod) -> bool:
        """Enrolled: the namespace is labelled ambient and the pod has not opted out."""
        if pod.labels.get(DATAPLANE_MODE_LABEL) == DATAPLANE_MODE_NONE:
            return False
        if pod.labels.get(DATAPLANE_MODE_LABEL) == DATAPLANE_MODE_AMBIENT:
            return True
        ns = self.namespace(pod.namespace)
        return ns is not None and ns.labels.get(DATAPLANE_MODE_LABEL) == DATAPLANE_MODE_AMBIENT

    def identity(self, pod: Pod) -> str:
        return pod.identity(self.trust_domain)

    # -- services --------------------------------------------------------------------------

    def service(self, namespace: str, name: str) -> Service | None:
        return self._svc_by_key.get(f"{namespace}/{name}")

    def service_by_vip(self, ip: str, port: int) -> tuple[Service, ServicePort] | None:
        return self._svc_by_vip_port.get((ip, port))

    def endpoints(self, service: Service, port: int) -> tuple[Endpoint, ...]:
        """Ready endpoints of a service port (the service port, not the target port)."""
        return self._endpoints.get((service.key, port), ())

    def routes_for_service(self, service: Service) -> tuple[HTTPRoute, ...]:
        return self._routes_by_service.get(service.key, ())

    # -- waypoints -------------------------------------------------------------------------

    def waypoint(self, namespace: str, name: str) -> Waypoint | None:
        return self._waypoint_by_key.get(f"{namespace}/{name}")

    def waypoint_pods(self, waypoint: Waypoint) -> tuple[Pod, ...]:
        return self._waypoint_pods.get(waypoint.key, ())

    def waypoint_for_service(self, service: Service) -> Waypoint | None:
        """The service's own `istio.io/use-waypoint` label wins over its namespace's; the
        value `none` opts a service out of its namespace's waypoint."""
        name = service.labels.get(USE_WAYPOINT_LABEL)
        if name is None:
            ns = self.namespace(service.namespace)
            name = ns.labels.get(USE_WAYPOINT_LABEL) if ns else None
        if not name or name == "none":
            return None
        return self.waypoint(service.namespace, name)

    # -- security --------------------------------------------------------------------------

    def policies_for(self, pod: Pod) -> PolicySet:
        """Selector-based policies for a workload (ztunnel's L4 enforcement). Policies with
        target_refs belong to waypoints and are not returned here."""
        by_action: dict[str, list[AuthorizationPolicy]] = {"ALLOW": [], "DENY": [], "AUDIT": []}
        for pol in self.authorization_policies:
            if pol.target_refs:
                continue
            if pol.namespace != pod.namespace and pol.namespace != self.root_namespace:
                continue
            if not selector_matches(pol.selector, pod.labels):
                continue
            by_action[pol.action.value].append(pol)
        if not any(by_action.values()):
            return NO_POLICIES
        return PolicySet(
            tuple(by_action["ALLOW"]), tuple(by_action["DENY"]), tuple(by_action["AUDIT"])
        )

    def config_map(self, namespace: str, name: str) -> ConfigMap | None:
        for cm in self.config_maps:
            if cm.namespace == namespace and cm.name == name:
                return cm
        return None

    def mtls_mode(self, pod: Pod, port: int) -> MtlsMode:
        """Effective PeerAuthentication mode: workload selector beats namespace beats mesh
        (root namespace); a port-level mode beats the policy's own. Default PERMISSIVE."""
        best: tuple[int, PeerAuthentication] | None = None
        for pa in self.peer_authentications:
            if pa.namespace == pod.namespace and pa.selector is not None:
                rank = 3 if selector_matches(pa.selector, pod.labels) else 0
            elif pa.namespace == pod.namespace:
                rank = 2
            elif pa.namespace == self.root_namespace and pa.selector is None:
                rank = 1
            else:
                rank = 0
            if rank and (best is None or rank > best[0]):
                best = (rank, pa)
        if best is None:
            return MtlsMode.PERMISSIVE
        pa = best[1]
        mode = pa.port_modes.get(port, pa.mode)
        if mode is MtlsMode.UNSET:
            return MtlsMode.PERMISSIVE
        return mode

    def with_version(self, version: int) -> Snapshot:
        return Snapshot(
            trust_domain=self.trust_domain,
            root_namespace=self.root_namespace,
            nodes=self.nodes,
            namespaces=self.namespaces,
            pods=self.pods,
            services=self.services,
            waypoints=self.waypoints,
            http_routes=self.http_routes,
            authorization_policies=self.authorization_policies,
            peer_authentications=self.peer_authentications,
            network_policies=self.network_policies,
            cilium_policies=self.cilium_policies,
            request_authentications=self.request_authentications,
            config_maps=self.config_maps,
            version=version,
        )
