"""Snapshot lookups: the tables the data path reads on every connection."""

from types import MappingProxyType

from mesh.config.model import (
    AuthorizationPolicy,
    MtlsMode,
    Namespace,
    PeerAuthentication,
    Pod,
    PolicyAction,
    Service,
    ServicePort,
    Waypoint,
)
from mesh.config.snapshot import Snapshot


def labels(**kv: str) -> MappingProxyType[str, str]:
    return MappingProxyType({k.replace("_", "."): v for k, v in kv.items()})


def make() -> Snapshot:
    amb = MappingProxyType({"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "wp"})
    return Snapshot(
        namespaces=(Namespace("shop", amb), Namespace("legacy")),
        pods=(
            Pod("shop", "web-1", "10.0.1.5", "n1", "web", MappingProxyType({"app": "web"})),
            Pod(
                "shop",
                "web-2",
                "10.0.2.5",
                "n2",
                "web",
                MappingProxyType({"app": "web"}),
                ready=False,
            ),
            Pod(
                "shop",
                "out",
                "10.0.1.6",
                "n1",
                labels=MappingProxyType({"istio.io/dataplane-mode": "none"}),
            ),
            Pod(
                "shop",
                "wp-0",
                "10.0.1.9",
                "n1",
                "wp",
                MappingProxyType({"gateway.networking.k8s.io/gateway-name": "wp"}),
            ),
            Pod("legacy", "old", "10.0.2.7", "n2"),
        ),
        services=(
            Service(
                "shop",
                "web",
                "10.96.0.10",
                (ServicePort(80, 8080),),
                MappingProxyType({"app": "web"}),
            ),
        ),
        waypoints=(Waypoint("shop", "wp"),),
        authorization_policies=(
            AuthorizationPolicy(
                "shop", "deny-all", PolicyAction.DENY, (), MappingProxyType({"app": "web"})
            ),
            AuthorizationPolicy("istio-system", "mesh", PolicyAction.ALLOW),
        ),
        peer_authentications=(
            PeerAuthentication("istio-system", "mesh", MtlsMode.STRICT),
            PeerAuthentication("legacy", "ns", MtlsMode.PERMISSIVE),
        ),
    )


def test_vip_resolves_to_ready_endpoints_only() -> None:
    snap = make()
    found = snap.service_by_vip("10.96.0.10", 80)
    assert found is not None
    svc, _ = found
    eps = snap.endpoints(svc, 80)
    assert [(e.pod.name, e.port) for e in eps] == [("web-1", 8080)]
    assert snap.service_by_vip("10.96.0.10", 81) is None


def test_enrolment_follows_namespace_label_and_pod_opt_out() -> None:
    snap = make()
    web, out, old = (snap.pod_by_ip(ip) for ip in ("10.0.1.5", "10.0.1.6", "10.0.2.7"))
    assert web and out and old
    assert snap.is_ambient(web)
    assert not snap.is_ambient(out)
    assert not snap.is_ambient(old)
    assert snap.identity(web) == "spiffe://cluster.local/ns/shop/sa/web"


def test_waypoint_from_namespace_label_and_its_pods() -> None:
    snap = make()
    svc = snap.service("shop", "web")
    assert svc is not None
    wp = snap.waypoint_for_service(svc)
    assert wp is not None and wp.name == "wp"
    assert [p.name for p in snap.waypoint_pods(wp)] == ["wp-0"]


def test_policies_select_by_labels_and_root_namespace() -> None:
    snap = make()
    web = snap.pod("shop", "web-1")
    out = snap.pod("shop", "out")
    assert web and out
    ps = snap.policies_for(web)
    assert [p.name for p in ps.deny] == ["deny-all"]
    assert [p.name for p in ps.allow] == ["mesh"]
    assert [p.name for p in snap.policies_for(out).deny] == []


def test_peer_authentication_namespace_beats_mesh() -> None:
    snap = make()
    web, old = snap.pod("shop", "web-1"), snap.pod("legacy", "old")
    assert web and old
    assert snap.mtls_mode(web, 8080) is MtlsMode.STRICT
    assert snap.mtls_mode(old, 8080) is MtlsMode.PERMISSIVE
