"""The CA: Deployment, Service, PodDisruptionBudget and the RBAC its token reviews need."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from mesh.ports import READINESS_PORT
from meshctl.install.objects import (
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
    name = "ambientmesh-ca"
    ca = v["ca"]
    dep: Obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(name, ns, name),
        "spec": {
            "replicas": ca["replicas"],
            "selector": {"matchLabels": labels(name)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                "metadata": {"labels": labels(name)},
                "spec": {
                    "serviceAccountName": name,
                    "affinity": {
                        "podAntiAffinity": {
                            "preferredDuringSchedulingIgnoredDuringExecution": [
                                {
                                    "weight": 100,
                                    "podAffinityTerm": {
                                        "topologyKey": "kubernetes.io/hostname",
                                        "labelSelector": {"matchLabels": labels(name)},
                                    },
                                }
                            ]
                        }
                    },
                    "containers": [
                        {
                            "name": "ca",
                            "image": image(v),
                            "imagePullPolicy": v["image"]["pullPolicy"],
                            "command": ["python3", "-m", "certs.service"],
                            "args": [
                                "--ca-dir",
                                "/etc/ambientmesh/ca",
                                "--trust-domain",
                                v["trustDomain"],
                                "--listen",
                                f"0.0.0.0:{ca['port']}",
                                "--authorizer",
                                "kubernetes",
                                "--token-audience",
                                ca["tokenAudience"],
                                "--ztunnel-service-account",
                                f"{ns}/ztunnel",
                            ],
                            "ports": [
                                {"name": "grpc-ca", "containerPort": ca["port"]},
                                {"name": "http-ready", "containerPort": READINESS_PORT},
                            ],
                            **probes(),
                            "resources": copy.deepcopy(ca["resources"]),
                            "securityContext": security_context(),
                            "volumeMounts": [
                                {"name": "ca", "mountPath": "/etc/ambientmesh/ca", "readOnly": True}
                            ],
                        }
                    ],
                    "volumes": [
                        {
                            "name": "ca",
                            "secret": {"secretName": ca["secretName"], "defaultMode": 0o400},
                        }
                    ],
                },
            },
        },
    }
    svc: Obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(name, ns, name),
        "spec": {
            "selector": labels(name),
            "ports": [
                {"name": "grpc-ca", "port": ca["port"], "targetPort": ca["port"], "protocol": "TCP"}
            ],
        },
    }
    rules = [
        rule(["authentication.k8s.io"], ["tokenreviews"], ["create"]),
        # placement checks: is a pod of this service account on the caller's node?
        rule([""], ["pods"], ["get", "list"]),
    ]
    return [
        service_account(name, ns, name),
        *rbac(name, name, ns, rules),
        dep,
        svc,
        pdb(name, ns, name, minAvailable=1),
    ]
