"""The waypoint controller: Deployment and the RBAC for the objects it writes."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

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
    ]
    return [
        service_account(name, ns, name),
        *rbac(f"ambientmesh-{name}", name, ns, rules),
        dep,
        pdb(name, ns, name, maxUnavailable=1),
    ]
