"""From a config snapshot to what one waypoint stream needs: a route table and backend picks.

The HBONE `:authority` names a Service VIP:port; `ServiceRoutes.for_authority` turns that into
the compiled `RouteTable` of the routes attached to that Service (and port), and `pick` turns a
chosen BackendRef (or None: no route matched, so the Service itself) into one ready endpoint.
Tables are compiled once per snapshot and dropped with it: the snapshot is swapped, never
mutated, so a cache keyed by the snapshot object is always consistent.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from mesh.config.model import BackendRef, ConfigError, HTTPRoute, Pod, Service, ServicePort
from mesh.config.snapshot import Snapshot
from waypoint.routing import RouteTable


class NoBackend(Exception):
    """The chosen backend has no ready endpoint (the proxy answers 503)."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where one try goes: the pod's address and port, and its node (for HBONE)."""

    ip: str
    port: int
    node: str | None
    service: str
    pod: Pod | None = None
    # "h2" when the service port declares HTTP/2 (appProtocol or port name grpc/http2/h2c),
    # "http/1.1" when it declares HTTP, "" when it says nothing (use the client's protocol).
    protocol: str = ""
    service_port: int = 0  # the Service port the target was picked for (telemetry)


class ServiceRoutes:
    """Per-snapshot view: route tables per (service, port) and round-robin endpoint choice."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self._tables: dict[tuple[str, int, str | None], RouteTable] = {}
        self._rr = itertools.count()
        # (service key, port) -> (the Service object, its targets): see `_targets_of`
        self._targets: dict[tuple[str, int], tuple[Service, tuple[Target, ...]]] = {}
        self.errors: list[str] = []  # routes this snapshot could not compile, for logs/config dump

    def for_authority(
        self, authority: str, consumer_ns: str | None = None
    ) -> tuple[Service, int, RouteTable] | None:
        host, _, port_s = authority.rpartition(":")
        if not port_s.isdigit():
            return None
        found = self.snapshot.service_by_vip(host.strip("[]"), int(port_s))
        if found is None:
            return None
        svc, sp = found
        return svc, sp.port, self.table(svc, sp.port, consumer_ns)

    def table(self, svc: Service, port: int, consumer_ns: str | None = None) -> RouteTable:
        """The routes for calls from `consumer_ns` to `svc:port`.

        Gateway API mesh (GEP-1294): a route in the Service's own namespace is a producer
        route and applies to every caller; a route in another namespace is a consumer route
        and applies only to callers from that namespace, instead of the producer routes."""
        key = (svc.key, port, consumer_ns if consumer_ns != svc.namespace else None)
        t = self._tables.get(key)
        if t is None:
            attached: list[HTTPRoute] = [
                r
                for r in self.snapshot.routes_for_service(svc)
                if any(
                    p.kind == "Service"
                    and p.name == svc.name
                    and p.namespace == svc.namespace
                    and p.port in (None, port)
                    for p in r.parent_refs
                )
            ]
            consumer = [r for r in attached if key[2] is not None and r.namespace == key[2]]
            producer = [r for r in attached if r.namespace == svc.namespace]
            t = self._tables[key] = self._compile(consumer or producer)
        return t

    def _compile(self, routes: list[HTTPRoute]) -> RouteTable:
        """Drop a route that does not compile (and say why) rather than fail the service."""
        good: list[HTTPRoute] = []
        for r in routes:
            try:
                RouteTable([r])
            except ConfigError as exc:
                self.errors.append(str(exc))
                continue
            good.append(r)
        return RouteTable(good)

    def pick(self, default: Service, default_port: int, ref: BackendRef | None) -> Target:
        if ref is None:
            svc, port = default, default_port
        else:
            found = self.snapshot.service(ref.namespace, ref.name)
            if found is None:
                raise NoBackend(f"backend service {ref.namespace}/{ref.name} does not exist")
            svc, port = found, ref.port if ref.port is not None else default_port
        key = (svc.key, port)
        cached = self._targets.get(key)
        if cached is not None and cached[0] is svc:
            targets = cached[1]
        else:
            targets = self._targets_of(svc, port)
            if not targets:
                raise NoBackend(f"service {svc.key} port {port} has no ready endpoints")
            self._targets[key] = (svc, targets)
        return targets[next(self._rr) % len(targets)]

    def _targets_of(self, svc: Service, port: int) -> tuple[Target, ...]:
        """A service port's targets, built once per snapshot (this object lives as long as
        its snapshot) rather than once per request."""
        sp = next((p for p in svc.ports if p.port == port), None)
        protocol = port_protocol(sp)
        out = []
        for ep in self.snapshot.endpoints(svc, port):
            assert ep.pod.ip is not None  # endpoints only hold pods with an IP
            out.append(Target(ep.pod.ip, ep.port, ep.pod.node, svc.key, ep.pod, protocol, port))
        return tuple(out)


_H2_NAMES = frozenset({"grpc", "grpc-web", "http2", "h2c", "kubernetes.io/h2c"})


def port_protocol(sp: ServicePort | None) -> str:
    """What a Service port declares about its protocol, Istio's way: `appProtocol` first,
    then the port name's prefix (`grpc-foo`, `http2`, `http-web`)."""
    if sp is None:
        return ""
    ap = sp.app_protocol.lower()
    name = sp.name.lower().split("-", 1)[0]
    if ap in _H2_NAMES or (not ap and name in _H2_NAMES):
        return "h2"
    if ap in ("http", "http/1.1") or (not ap and name == "http"):
        return "http/1.1"
    return ""
