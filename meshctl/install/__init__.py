"""`meshctl install --render`: a mesh installation's Kubernetes manifests, with the user's values.

The manifests are built as data here (not text templates), so a value can never produce broken
YAML and the tests can validate every object against the Kubernetes schemas. `deploy/` holds
the default render for `kubectl apply -f` without meshctl; a test keeps it in sync.

What gets installed, and why it looks the way it does:

* ztunnel DaemonSet: hostNetwork (HBONE :15008 on the node address), privileged (BPF program
  load and cgroup attach, `setns` into pod netns), host mounts for bpffs, cgroup v2, the netns
  dir (HostToContainer propagation so pods' netns mounts appear), CNI bin/conf dirs, kernel
  modules and headers (BCC compiles the programs on the node), and /run/ambientmesh (the
  enrolment socket the CNI plugin dials). A second container keeps the CNI plugin installed
  and chained (cni.install). RollingUpdate with maxUnavailable so a bad rollout stops.
* CA Deployment (2 replicas sharing the CA key from a Secret, PodDisruptionBudget minAvailable
  1) behind a Service on 15012; it reviews ztunnel tokens (TokenReview), so ztunnel mounts a
  projected token with the CA's audience, and the trust bundle from the ConfigMap
  `ambientmesh-ca-root` (never the Secret). Before installing, from `meshctl ca init DIR`:
  `kubectl -n ambientmesh-system create secret generic ambientmesh-ca --from-file=DIR` and
  `kubectl -n ambientmesh-system create configmap ambientmesh-ca-root
  --from-file=root-cert.pem=DIR/root-cert.pem`.
* waypoint controller Deployment: Gateway (class `waypoint`) → Deployment + Service, and a
  copy of the trust bundle ConfigMap beside it (pods mount their own namespace's only); the
  waypoint gets its SVID from the CA with its projected service-account token.
* RBAC, least privilege: ztunnel, the waypoints (ClusterRole `ambientmesh-waypoint`) and the
  CA only read (the CA also creates TokenReviews); only the controller writes, and only
  Deployments, Services, ServiceAccounts, ConfigMaps, Gateway status and the one
  ClusterRoleBinding `ambientmesh-waypoint` (with `bind` on that role only), whose subjects
  it keeps equal to the waypoints' ServiceAccounts.
* ztunnel serves the read-only flow stream on `observe.flowsPort` (15030; 0/off: not at all
  beyond its loopback admin port) for `meshctl observe --kube`; hostNetwork makes that the
  node's port, which says who talks to whom (see the README's ports).
  RBAC cannot scope by field, so "pods on this node" is enforced by the CA, not by RBAC.
* CRDs for Istio's AuthorizationPolicy and PeerAuthentication (security.istio.io, v1 and
  v1beta1, structural schemas, the same fields as Istio's): skip them with
  `--set crds.install=false` where Istio's own CRDs are already installed. Gateway API CRDs
  come from the Gateway API release, not from us.

The package renders each component in its own module (`ztunnel`, `ca`, `controller`, `crds`)
from the merged `values`, with the shared building blocks in `objects`.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from meshctl.errors import UsageError
from meshctl.image import parse_ref
from meshctl.install import ca, controller, ztunnel
from meshctl.install.objects import labels
from meshctl.install.schemas import crds
from meshctl.install.values import DEFAULT_VALUES, Obj, merge_values, parse_set

__all__ = ["DEFAULT_VALUES", "crds", "merge_values", "register", "render", "render_yaml"]

# -- components ------------------------------------------------------------------------------


def _namespace(v: Mapping[str, Any]) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": v["namespace"],
            # the mesh's own pods are never enrolled: ztunnel cannot tunnel itself
            "labels": {**labels("ambientmesh"), "istio.io/dataplane-mode": "none"},
        },
    }


# -- render ----------------------------------------------------------------------------------


def render(values: Mapping[str, Any] | None = None) -> list[Obj]:
    """Every object of an installation, in apply order (CRDs and namespace first)."""
    v = merge_values(DEFAULT_VALUES, values or {})
    objs: list[Obj] = []
    if v["crds"]["install"]:
        objs += crds()
    objs.append(_namespace(v))
    objs += ca.objects(v)
    objs += ztunnel.objects(v)
    objs += controller.objects(v)
    return objs


def render_yaml(values: Mapping[str, Any] | None = None) -> str:
    docs = render(values)
    return "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs)


def _cmd_install(args: argparse.Namespace) -> int:
    if not args.render:
        raise UsageError(
            "only --render is supported: meshctl install --render | kubectl apply -f -"
        )
    values: Obj = {}
    for f in args.values or []:
        try:
            loaded = yaml.safe_load(Path(f).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"--values {f}: {exc}") from None
        if not isinstance(loaded, Mapping):
            raise UsageError(f"--values {f}: must be a mapping")
        values = _deep(values, loaded)
    for expr in args.set or []:
        values = _deep(values, parse_set(expr))
    if args.image:
        repository, tag = parse_ref(args.image)
        values = _deep(values, {"image": {"repository": repository, "tag": tag}})
    sys.stdout.write(render_yaml(values))
    return 0


def _deep(a: Mapping[str, Any], b: Mapping[str, Any]) -> Obj:
    out = copy.deepcopy(dict(a))
    for k, val in b.items():
        if isinstance(val, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep(out[k], val)
        else:
            out[k] = copy.deepcopy(val)
    return out


def register(sub: Any) -> None:
    p = sub.add_parser("install", help="render the Kubernetes manifests of an installation")
    p.add_argument("--render", action="store_true", help="print the manifests (YAML) to stdout")
    p.add_argument("--values", action="append", metavar="FILE", help="YAML values file")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one value, e.g. --set ztunnel.maxUnavailable=2",
    )
    p.add_argument(
        "--image",
        metavar="REF",
        help="the image every component runs (REPOSITORY:TAG), e.g. the one `meshctl image "
        "build` made and `kind load image-archive` loaded; default: the version's tag",
    )
    p.set_defaults(func=_cmd_install)
