"""Building blocks every component's manifests share: labels and metadata, probes, RBAC,
service accounts, disruption budgets, security contexts, and the ports and names the
components agree on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mesh.ports import READINESS_PORT
from meshctl.install.values import Obj

CA_ROOT_CONFIGMAP = "ambientmesh-ca-root"

ENROL_SOCKET_DIR = "/run/ambientmesh"


# -- helpers ---------------------------------------------------------------------------------


def labels(component: str) -> Obj:
    return {
        "app.kubernetes.io/name": component,
        "app.kubernetes.io/part-of": "ambientmesh",
    }


def meta(name: str, ns: str | None, component: str) -> Obj:
    m: Obj = {"name": name, "labels": labels(component)}
    if ns is not None:
        m["namespace"] = ns
    return m


def image(v: Mapping[str, Any]) -> str:
    return f"{v['image']['repository']}:{v['image']['tag']}"


def probes() -> Obj:
    http = {"path": "/healthz/ready", "port": READINESS_PORT}
    return {
        "readinessProbe": {
            "httpGet": dict(http),
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": dict(http),
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
    }


def env_field(name: str, path: str) -> Obj:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def rule(groups: list[str], resources: list[str], verbs: list[str]) -> Obj:
    return {"apiGroups": groups, "resources": resources, "verbs": verbs}


READ = ["get", "list", "watch"]


def rbac(name: str, sa: str, ns: str, rules: list[Obj]) -> list[Obj]:
    """A ClusterRole `name` with `rules`, bound to ServiceAccount `ns/sa`."""
    component = sa
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": meta(name, None, component),
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": meta(name, None, component),
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": name,
            },
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}],
        },
    ]


def service_account(name: str, ns: str, component: str) -> Obj:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(name, ns, component)}


def pdb(name: str, ns: str, component: str, **budget: Any) -> Obj:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta(name, ns, component),
        "spec": {**budget, "selector": {"matchLabels": labels(component)}},
    }


def security_context(privileged: bool = False) -> Obj:
    if privileged:
        return {"privileged": True, "runAsUser": 0, "runAsNonRoot": False}
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": 1337,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
