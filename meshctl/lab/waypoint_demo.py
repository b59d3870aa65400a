"""The waypoint part of `meshctl lab demo`: a weighted split, observed from inside a pod.

For every HTTPRoute or GRPCRoute in the lab that splits a service served by a waypoint between
weighted backends, the demo starts the namespace's waypoint (`apply_waypoint`), waits until traffic
really crosses it (its own request counter moves), then sends requests from a client pod in
that namespace and reports which pod answered each: the shares must match the weights
(within a tolerance that a correct split passes with overwhelming probability at this count).
An HTTPRoute is driven with `mesh.apps.client` (HTTP/1.1), a GRPCRoute with
`mesh.apps.grpc_client` (real gRPC calls on one HTTP/2 channel) calling the method its first
rule matches; both print the same JSON lines.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass

from mesh.config.model import USE_WAYPOINT_LABEL, HTTPRoute, Service, ValueMatchType
from mesh.config.snapshot import Snapshot, selector_matches
from meshctl.lab import observe
from meshctl.lab.lab import Lab
from meshctl.lab.system import LabError, patience
from meshctl.lab.waypoints import apply_waypoint, waypoint_metrics

TOLERANCE = 0.08  # absolute share; with 400 requests that is ~4 standard deviations at 80/20
DEMO_GRPC_SERVICE, DEMO_GRPC_METHOD = "ambientmesh.demo.Echo", "Who"  # mesh.apps.grpc_echo


@dataclass(frozen=True, slots=True)
class Split:
    service: Service
    port: int
    route: HTTPRoute
    waypoint: str
    client: str  # a pod of the namespace that is not a backend
    weights: dict[str, float]  # backend service name -> expected share
    grpc_method: str | None = None  # a GRPCRoute's split: the /<service>/<method> to call


def splits(snap: Snapshot) -> list[Split]:
    out: list[Split] = []
    for r in snap.http_routes:
        method = _grpc_method(r) if r.kind == "GRPCRoute" else None
        if r.kind == "GRPCRoute" and method is None:
            continue  # no method we can name matches it (a regex): nothing to call
        for ref in r.parent_refs:
            svc = snap.service(ref.namespace, ref.name) if ref.kind == "Service" else None
            wp = _wanted_waypoint(snap, svc) if svc is not None else None
            if svc is None or wp is None or not r.rules:
                continue
            refs = [b for b in r.rules[0].backend_refs if b.weight > 0]
            total = sum(b.weight for b in refs)
            if len(refs) < 2 or not total:
                continue
            client = next(
                (p for p in snap.pods if p.namespace == svc.namespace and p.ip
                 and not selector_matches(svc.selector, p.labels)
                 and snap.is_ambient(p)),
                None,
            )  # fmt: skip
            if client is None:
                continue
            port = ref.port or svc.ports[0].port
            weights = {b.name: b.weight / total for b in refs}
            out.append(Split(svc, port, r, wp, client.name, weights, method))
    return out


def _grpc_method(route: HTTPRoute) -> str | None:
    """A method the first rule of a GRPCRoute matches: what its exact match names, filled in
    with the demo server's defaults (the lab's gRPC echo answers any method)."""
    matches = route.rules[0].matches if route.rules else ()
    if not matches:
        return f"/{DEMO_GRPC_SERVICE}/{DEMO_GRPC_METHOD}"
    for m in matches:
        g = m.grpc_method
        if g is None:
            return f"/{DEMO_GRPC_SERVICE}/{DEMO_GRPC_METHOD}"
        if g.type == ValueMatchType.EXACT:
            return f"/{g.service or DEMO_GRPC_SERVICE}/{g.method or DEMO_GRPC_METHOD}"
    return None


def _client(sp: Split, count: int) -> list[str]:
    """The in-pod client command for one run of `count` requests (or gRPC calls)."""
    timeout = ["--timeout", str(patience(3))]
    if sp.grpc_method is not None:
        target = f"{sp.service.cluster_ip}:{sp.port}"
        return ["python", "-m", "mesh.apps.grpc_client", target, "--method", sp.grpc_method,
                "--count", str(count), *timeout]  # fmt: skip
    url = f"http://{sp.service.cluster_ip}:{sp.port}/split"
    return ["python", "-m", "mesh.apps.client", url, "--count", str(count), *timeout]


def _wanted_waypoint(snap: Snapshot, svc: Service) -> str | None:
    """The waypoint a service asks for (its label, else its namespace's), declared or not:
    the demo is what declares it."""
    name = svc.labels.get(USE_WAYPOINT_LABEL)
    if name is None:
        ns = snap.namespace(svc.namespace)
        name = ns.labels.get(USE_WAYPOINT_LABEL) if ns else None
    return None if not name or name == "none" else name


def _waypoint_requests(lab: Lab, ns: str, name: str) -> float:
    try:
        samples = observe.parse_metrics(waypoint_metrics(lab, ns, name))
    except (OSError, LabError):
        return 0.0
    return sum(s.value for s in samples if s.name == "istio_requests_total")


def run_split(lab: Lab, sp: Split, *, count: int = 400) -> bool:
    ns = sp.service.namespace
    apply_waypoint(lab, ns, sp.waypoint)
    deadline = time.monotonic() + patience(20)
    start = _waypoint_requests(lab, ns, sp.waypoint)  # another split may have counted some
    while True:  # the ztunnels reload the config: wait until calls really cross the waypoint
        warm = lab.exec_in_pod(ns, sp.client, _client(sp, 1))
        if (sp.grpc_method is None or warm.returncode == 0) and _waypoint_requests(
            lab, ns, sp.waypoint
        ) > start:
            break
        if time.monotonic() > deadline:
            raise LabError(
                f"no traffic reached waypoint {ns}/{sp.waypoint} within {patience(20):.0f}s"
            )
        time.sleep(0.5)
    before = _waypoint_requests(lab, ns, sp.waypoint)
    res = lab.exec_in_pod(ns, sp.client, _client(sp, count), timeout=patience(120))
    pods: Counter[str] = Counter()
    failed = 0
    for line in res.stdout.splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if d.get("ok") and isinstance(d.get("body"), dict):
            pods[str(d["body"].get("pod"))] += 1
        else:
            failed += 1
    through = _waypoint_requests(lab, ns, sp.waypoint) - before
    snap = lab.snapshot()
    what = f"gRPC calls of {sp.grpc_method}" if sp.grpc_method else "requests"
    print(f"\n{ns}/{sp.client} -> {sp.service.name}:{sp.port} through waypoint "
          f"{ns}/{sp.waypoint} ({sp.route.kind} {sp.route.key}), {count} {what}:")  # fmt: skip
    ok = failed == 0 and through >= count
    for backend, want in sorted(sp.weights.items()):
        bsvc = snap.service(ns, backend)
        members = [p.name for p in snap.pods if bsvc is not None and p.namespace == ns
                   and selector_matches(bsvc.selector, p.labels)]  # fmt: skip
        got = sum(pods[m] for m in members) / count
        good = abs(got - want) <= TOLERANCE
        ok = ok and good
        print(f"  {backend:<16} {got * 100:5.1f} %  (weight {want * 100:.0f} %)"
              f"{'' if good else '  <-- outside tolerance'}")  # fmt: skip
    print(f"  waypoint counted {through:.0f} requests; {failed} failed")
    return ok


def run_all(lab: Lab) -> bool:
    """Every split in the lab; True when each matched its weights (or there is none)."""
    ok = True
    for sp in splits(lab.snapshot()):
        ok = run_split(lab, sp) and ok
    return ok
