"""The waypoint controller: Deployment and the RBAC for the objects it writes; and the
ClusterRole every waypoint reads its config with (`waypoint --kube`), which the controller
binds to the waypoints' ServiceAccounts as Gateways come and go."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from mesh.config.kube import WAYPOINT_KINDS
from mesh.ports import READINESS_PORT
from meshctl.install.objects import (
    READ,
    image,
    labels,
    meta,
    pdb,
    probes,
    rbac,
    rule,
    security_context,
    service_account,
)
from meshctl.install.values import Obj

# controller.waypoint.WAYPOINT_CLUSTER_ROLE: the controller reconciles the binding of this name
WAYPOINT_CLUSTER_ROLE = "ambientmesh-waypoint"
RBAC_GROUP = "rbac.authorization.k8s.io"


def waypoint_read_rules() -> list[Obj]:
    """get/list/watch on exactly the kinds a waypoint watches (mesh.config.kube.WAYPOINT_KINDS),
    one rule per API group, so the role cannot drift from what the source asks for. RBAC
    cannot scope by label: the waypoint may read every ConfigMap, though it asks only for the
    labelled JWKS ones."""
    groups: dict[str, list[str]] = {}
    for wk in WAYPOINT_KINDS:
        groups.setdefault(wk.group, []).append(wk.plural)
    return [rule([g], sorted(plurals), READ) for g, plurals in groups.items()]


def waypoint_cluster_role() -> Obj:
    return {
        "apiVersion": f"{RBAC_GROUP}/v1",
        "kind": "ClusterRole",
        "metadata": meta(WAYPOINT_CLUSTER_ROLE, None, "waypoint"),
        "rules": waypoint_read_rules(),
    }


def objects(v: Mapping[str, Any]) -> list[Obj]:
    ns = v["namespace"]
    name = "waypoint-controller"
    c = v["controller"]
    dep: Obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(name, ns, name),
        "spec": {
            "replicas": c["replicas"],
            "selector": {"matchLabels": labels(name)},
            "template": {
                "metadata": {"labels": labels(name)},
                "spec": {
                    "serviceAccountName": name,
                    "containers": [
                        {
                            "name": "controller",
                            "image": image(v),
                            "imagePullPolicy": v["image"]["pullPolicy"],
                            "command": ["python3", "-m", "controller.waypoint"],
                            "args": [
                                "--image",
                                image(v),
                                "--trust-domain",
                                v["trustDomain"],
                                "--readiness-addr",
                                f"0.0.0.0:{READINESS_PORT}",
                                "--ca-address",
                                f"ambientmesh-ca.{ns}.svc:{v['ca']['port']}",
                                "--mesh-namespace",
                                ns,
                            ],
                            "ports": [{"name": "http-ready", "containerPort": READINESS_PORT}],
                            **probes(),
                            "resources": copy.deepcopy(c["resources"]),
                            "securityContext": security_context(),
                        }
                    ],
                },
            },
        },
    }
    rules = [
        rule(["gateway.networking.k8s.io"], ["gateways"], READ),
        rule(["gateway.networking.k8s.io"], ["gateways/status"], ["get", "update", "patch"]),
        rule(["apps"], ["deployments"], [*READ, "create", "update", "patch", "delete"]),
        rule([""], ["services", "serviceaccounts"], [*READ, "create", "update", "patch", "delete"]),
        # the trust bundle: read from the mesh's namespace, copied beside each waypoint
        rule([""], ["configmaps"], [*READ, "create", "update", "patch", "delete"]),
        # the waypoints' read access: one ClusterRoleBinding whose subjects the controller
        # keeps; `create` cannot be limited by name, the rest is limited to that binding
        rule([RBAC_GROUP], ["clusterrolebindings"], ["create"]),
        {
            **rule([RBAC_GROUP], ["clusterrolebindings"], ["get", "update", "patch"]),
            "resourceNames": [WAYPOINT_CLUSTER_ROLE],
        },
        # binding a role needs its permissions or `bind` on it: `bind`, on that role only
        {
            **rule([RBAC_GROUP], ["clusterroles"], ["bind"]),
            "resourceNames": [WAYPOINT_CLUSTER_ROLE],
        },
    ]
    return [
        service_account(name, ns, name),
        *rbac(f"ambientmesh-{name}", name, ns, rules),
        waypoint_cluster_role(),
        dep,
        pdb(name, ns, name, maxUnavailable=1),
    ]
