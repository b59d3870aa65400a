"""The admin `/config_dump`: what this proxy believes, as JSON an operator can read.

Everything is rendered from the Snapshot the data path uses, so a dump never disagrees with
behaviour. Enum values and durations keep their manifest spelling where one exists.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from mesh.config.snapshot import Snapshot


def _plain(v: Any) -> Any:
    if isinstance(v, enum.Enum):
        return v.value
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    return v


def snapshot_to_json(snap: Snapshot) -> dict[str, Any]:
    workloads = []
    for pod in snap.pods:
        w = _plain(pod)
        w["identity"] = snap.identity(pod)
        w["ambient"] = snap.is_ambient(pod)
        workloads.append(w)
    services = []
    for svc in snap.services:
        s = _plain(svc)
        s["hostname"] = svc.hostname
        wp = snap.waypoint_for_service(svc)
        s["waypoint"] = wp.key if wp else None
        s["endpoints"] = {
            str(sp.port): [
                {"pod": e.pod.key, "address": f"{e.pod.ip}:{e.port}", "node": e.pod.node}
                for e in snap.endpoints(svc, sp.port)
            ]
            for sp in svc.ports
        }
        services.append(s)
    waypoints = []
    for wp in snap.waypoints:
        d = _plain(wp)
        d["pods"] = [p.key for p in snap.waypoint_pods(wp)]
        waypoints.append(d)
    return {
        "version": snap.version,
        "trust_domain": snap.trust_domain,
        "root_namespace": snap.root_namespace,
        "nodes": _plain(snap.nodes),
        "namespaces": _plain(snap.namespaces),
        "workloads": workloads,
        "services": services,
        "waypoints": waypoints,
        "http_routes": _plain(snap.http_routes),
        "authorization_policies": _plain(snap.authorization_policies),
        "peer_authentications": _plain(snap.peer_authentications),
        "network_policies": _plain(snap.network_policies),
        "cilium_policies": _plain(snap.cilium_policies),
        "request_authentications": _plain(snap.request_authentications),
        "config_maps": _plain(snap.config_maps),
    }
