"""The waypoint part of `meshctl lab demo`: a weighted split, observed from inside a pod.

For every HTTPRoute in the lab that splits a service served by a waypoint between weighted
backends, the demo starts the namespace's waypoint (`apply_waypoint`), waits until traffic
really crosses it (its own request counter moves), then sends requests from a client pod in
that namespace and reports which pod answered each: the shares must match the weights
(within a tolerance that a correct split passes with overwhelming probability at this count).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass

from mesh.config.model import USE_WAYPOINT_LABEL, HTTPRoute, Service
from mesh.config.snapshot import Snapshot, selector_matches
from meshctl.lab import observe
from meshctl.lab.lab import Lab
from meshctl.lab.system import LabError, patience
from meshctl.lab.waypoints import apply_waypoint, waypoint_metrics

TOLERANCE = 0.08  # absolute share; with 400 requests that is ~4 standard deviations at 80/20


@dataclass(frozen=True, slots=True)
class Split:
    service: Service
    port: int
    route: HTTPRoute
    waypoint: str
    client: str  # a pod of the namespace that is not a backend
    weights: dict[str, float]  # backend service name -> expected share


def splits(snap: Snapshot) -> list[Split]:
    out: list[Split] = []
    for r in snap.http_routes:
        if r.kind != "HTTPRoute":
            continue  # the demo's client speaks HTTP/1.1; a GRPCRoute never matches it
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
            out.append(Split(svc, port, r, wp, client.name, weights))
    return out


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
    url = f"http://{sp.service.cluster_ip}:{sp.port}/split"
    deadline = time.monotonic() + patience(20)
    while True:  # the ztunnels reload the config: wait until calls really cross the waypoint
        lab.exec_in_pod(
            ns, sp.client, ["python", "-m", "mesh.apps.client", url, "--timeout", str(patience(3))]
        )
        if _waypoint_requests(lab, ns, sp.waypoint) > 0:
            break
        if time.monotonic() > deadline:
            raise LabError(
                f"no traffic reached waypoint {ns}/{sp.waypoint} within {patience(20):.0f}s"
            )
        time.sleep(0.5)
    before = _waypoint_requests(lab, ns, sp.waypoint)
    res = lab.exec_in_pod(
        ns, sp.client, ["python", "-m", "mesh.apps.client", url, "--count", str(count),
                        "--timeout", str(patience(3))], timeout=patience(120),
    )  # fmt: skip
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
    print(f"\n{ns}/{sp.client} -> {sp.service.name}:{sp.port} through waypoint "
          f"{ns}/{sp.waypoint} (HTTPRoute {sp.route.key}), {count} requests:")  # fmt: skip
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
