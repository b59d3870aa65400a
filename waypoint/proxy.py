"""One waypoint: its identity, HBONE listener, upstream pool and request handler, assembled.

The process (`waypoint.main`) and the integration tests build the same object, so what the
tests exercise is what runs. Config arrives as a `Snapshot` getter: each new CONNECT stream
uses the snapshot current at that moment (route tables compiled once per snapshot), so a
config swap affects new streams while in-flight ones finish on the config they started with.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping

from mesh.config.snapshot import Snapshot
from mesh.flows import FlowRing
from mesh.hbone import HbonePool, serve
from mesh.hbone.pool import Listener
from mesh.identity.manager import Identities
from mesh.identity.spiffe import workload_id
from mesh.metrics import MeshMetrics
from mesh.otlp import OtlpExporter
from mesh.ports import HBONE_PORT
from waypoint.inbound import WaypointInbound
from waypoint.limits import Limits
from waypoint.request import RequestHandler
from waypoint.service import ServiceRoutes
from waypoint.upstream import Upstreams

log = logging.getLogger("waypoint")

__all__ = ["Routes", "Waypoint"]


class Routes:
    """The route tables of the current snapshot, rebuilt only when the snapshot changes; a
    route that does not compile is dropped with an error naming it and the field, and the
    rest keep serving."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot
        self._routes = ServiceRoutes(snapshot())

    def __call__(self) -> ServiceRoutes:
        snap = self.snapshot()
        if self._routes.snapshot is not snap:
            self._routes = ServiceRoutes(snap)
            for err in self._routes.errors:
                log.error("route dropped: %s", err)
        return self._routes


class Waypoint:
    def __init__(
        self,
        namespace: str,
        name: str,
        snapshot: Callable[[], Snapshot],
        identities: Identities,
        *,
        trust_domain: str = "cluster.local",
        service_account: str | None = None,
        metrics: MeshMetrics | None = None,
        hbone_port: int = HBONE_PORT,
        node_ports: Mapping[str, int] | None = None,
        rng: random.Random | None = None,
        limits: Limits | None = None,
        exporter: OtlpExporter | None = None,
        forwarded: bool = False,
        trace_sampling: float = 1.0,
        flows: FlowRing | None = None,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.trust_domain = trust_domain
        self.identities = identities
        # The controller names the ServiceAccount after the Gateway; ztunnels trust a
        # waypoint's vouching for its callers by this identity.
        self.identity = workload_id(trust_domain, namespace, service_account or name)
        self.metrics = metrics or MeshMetrics()
        self.pool = HbonePool(identities.client_context_async, trust_domain=trust_domain)
        self.routes = Routes(snapshot)
        self.upstreams = Upstreams(
            self.pool, self.identity, snapshot, hbone_port=hbone_port, node_ports=node_ports
        )
        self.flows = flows if flows is not None else FlowRing(proxy=f"waypoint-{namespace}")
        # `Forwarded: by=` names this waypoint by an RFC 7239 obfuscated identifier: its
        # address says nothing useful to a backend (and may be any of the pod's).
        self.handler = RequestHandler(
            self.upstreams,
            self.metrics,
            trust_domain=trust_domain,
            rng=rng,
            exporter=exporter,
            forwarded_by=f"_{name}.{namespace}" if forwarded else None,
            trace_sampling=trace_sampling,
            flows=self.flows,
        )
        self.limits = limits or Limits()
        self.inbound = WaypointInbound(namespace, name, self.routes, self.handler, self.limits)
        self.listener: Listener | None = None

    async def listen(self, host: str = "0.0.0.0", port: int = HBONE_PORT) -> Listener:
        await self.identities.ensure(self.identity)
        self.listener = await serve(
            host,
            port,
            self.identities.listener_context(self.identity),
            self.inbound,
            trust_domain=self.trust_domain,
        )
        return self.listener

    @property
    def port(self) -> int:
        assert self.listener is not None
        return int(self.listener.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
        await self.handler.close()
        self.upstreams.close()
        self.pool.close()
