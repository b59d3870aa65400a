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
* RBAC, least privilege: ztunnel and the CA only read (the CA also creates TokenReviews); only
  the controller writes, and only Deployments, Services, ServiceAccounts and Gateway status.
  RBAC cannot scope by field, so "pods on this node" is enforced by the CA, not by RBAC.
* CRDs for Istio's AuthorizationPolicy and PeerAuthentication (security.istio.io, v1 and
  v1beta1, structural schemas, the same fields as Istio's): skip them with
  `--set crds.install=false` where Istio's own CRDs are already installed. Gateway API CRDs
  come from the Gateway API release, not from us.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from mesh.config.model import DEFAULT_ROOT_NAMESPACE, DEFAULT_TRUST_DOMAIN
from mesh.ports import CA_PORT, HBONE_PORT, METRICS_PORT, READINESS_PORT
from meshctl.errors import UsageError

CA_ROOT_CONFIGMAP = "ambientmesh-ca-root"

__all__ = ["DEFAULT_VALUES", "crds", "merge_values", "register", "render", "render_yaml"]

Obj = dict[str, Any]

DEFAULT_VALUES: Obj = {
    "namespace": "ambientmesh-system",
    "trustDomain": DEFAULT_TRUST_DOMAIN,
    "rootNamespace": DEFAULT_ROOT_NAMESPACE,
    "image": {
        "repository": "ghcr.io/ambientmesh/ambientmesh",
        "tag": "0.1.0",
        "pullPolicy": "IfNotPresent",
    },
    "logLevel": "info",
    "crds": {"install": True},
    "ztunnel": {
        "maxUnavailable": 1,
        "resources": {
            "requests": {"cpu": "200m", "memory": "256Mi"},
            "limits": {"memory": "1Gi"},
        },
        "extraArgs": [],
    },
    "cni": {
        "binDir": "/opt/cni/bin",
        "confDir": "/etc/cni/net.d",
        "excludeNamespaces": ["kube-system"],
        "resources": {
            "requests": {"cpu": "10m", "memory": "64Mi"},
            "limits": {"memory": "128Mi"},
        },
    },
    "ca": {
        "replicas": 2,
        "port": CA_PORT,
        "secretName": "ambientmesh-ca",
        "tokenAudience": "ambientmesh-ca",
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"memory": "512Mi"},
        },
    },
    "controller": {
        "replicas": 1,
        "resources": {
            "requests": {"cpu": "50m", "memory": "96Mi"},
            "limits": {"memory": "256Mi"},
        },
    },
}

ENROL_SOCKET_DIR = "/run/ambientmesh"


# -- values ----------------------------------------------------------------------------------


def merge_values(base: Mapping[str, Any], override: Mapping[str, Any], path: str = "") -> Obj:
    """Deep-merge `override` into `base`; a key `base` does not have is a UsageError (typos in
    values files must not be silently ignored)."""
    out = copy.deepcopy(dict(base))
    for k, v in override.items():
        where = f"{path}.{k}" if path else str(k)
        if k not in out:
            raise UsageError(f"unknown value {where!r}")
        if isinstance(out[k], dict):
            if not isinstance(v, Mapping):
                raise UsageError(f"value {where!r} must be a mapping")
            # resources and similar maps are replaced wholesale below their known keys
            if where.endswith("resources"):
                out[k] = copy.deepcopy(dict(v))
            else:
                out[k] = merge_values(out[k], v, where)
        else:
            if isinstance(out[k], list) and not isinstance(v, list):
                raise UsageError(f"value {where!r} must be a list")
            out[k] = copy.deepcopy(v)
    return out


def parse_set(expr: str) -> Obj:
    """`a.b.c=value` → {"a": {"b": {"c": value}}}; the value is a YAML scalar/flow value."""
    key, sep, raw = expr.partition("=")
    if not sep or not key:
        raise UsageError(f"--set {expr!r}: expected KEY=VALUE")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        raise UsageError(f"--set {expr!r}: {exc}") from None
    if isinstance(value, float):  # no value of ours is a float; "1.10" is a tag, not 1.1
        value = raw
    out: Obj = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


# -- helpers ---------------------------------------------------------------------------------


def _labels(component: str) -> Obj:
    return {
        "app.kubernetes.io/name": component,
        "app.kubernetes.io/part-of": "ambientmesh",
    }


def _meta(name: str, ns: str | None, component: str) -> Obj:
    m: Obj = {"name": name, "labels": _labels(component)}
    if ns is not None:
        m["namespace"] = ns
    return m


def _image(v: Mapping[str, Any]) -> str:
    return f"{v['image']['repository']}:{v['image']['tag']}"


def _probes() -> Obj:
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


def _env_field(name: str, path: str) -> Obj:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _rule(groups: list[str], resources: list[str], verbs: list[str]) -> Obj:
    return {"apiGroups": groups, "resources": resources, "verbs": verbs}


READ = ["get", "list", "watch"]


def _rbac(name: str, sa: str, ns: str, rules: list[Obj]) -> list[Obj]:
    """A ClusterRole `name` with `rules`, bound to ServiceAccount `ns/sa`."""
    component = sa
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": _meta(name, None, component),
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": _meta(name, None, component),
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": name,
            },
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}],
        },
    ]


def _sa(name: str, ns: str, component: str) -> Obj:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(name, ns, component)}


def _pdb(name: str, ns: str, component: str, **budget: Any) -> Obj:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(name, ns, component),
        "spec": {**budget, "selector": {"matchLabels": _labels(component)}},
    }


def _security(privileged: bool = False) -> Obj:
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


# -- components ------------------------------------------------------------------------------


def _namespace(v: Mapping[str, Any]) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": v["namespace"],
            # the mesh's own pods are never enrolled: ztunnel cannot tunnel itself
            "labels": {**_labels("ambientmesh"), "istio.io/dataplane-mode": "none"},
        },
    }


def _ztunnel(v: Mapping[str, Any]) -> list[Obj]:
    ns = v["namespace"]
    name = "ztunnel"
    zt = v["ztunnel"]
    cni = v["cni"]
    host_paths = [
        ("bpffs", "/sys/fs/bpf", "/sys/fs/bpf", "DirectoryOrCreate", "Bidirectional", False),
        ("cgroup", "/sys/fs/cgroup", "/sys/fs/cgroup", "Directory", None, False),
        (
            "netns",
            "/var/run/netns",
            "/var/run/netns",
            "DirectoryOrCreate",
            "HostToContainer",
            False,
        ),
        ("run", ENROL_SOCKET_DIR, ENROL_SOCKET_DIR, "DirectoryOrCreate", None, False),
        ("modules", "/lib/modules", "/lib/modules", "Directory", None, True),
        ("usr-src", "/usr/src", "/usr/src", "Directory", None, True),
    ]
    mounts: list[Obj] = []
    volumes: list[Obj] = []
    for vol, host, path, typ, prop, ro in host_paths:
        volumes.append({"name": vol, "hostPath": {"path": host, "type": typ}})
        m: Obj = {"name": vol, "mountPath": path}
        if prop:
            m["mountPropagation"] = prop
        if ro:
            m["readOnly"] = True
        mounts.append(m)
    volumes += [
        {"name": "cni-bin", "hostPath": {"path": cni["binDir"], "type": "DirectoryOrCreate"}},
        {"name": "cni-conf", "hostPath": {"path": cni["confDir"], "type": "DirectoryOrCreate"}},
        {
            "name": "ca-token",
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": v["ca"]["tokenAudience"],
                            "expirationSeconds": 3600,
                            "path": "ca-token",
                        }
                    }
                ]
            },
        },
    ]
    mounts.append({"name": "ca-token", "mountPath": "/var/run/secrets/tokens", "readOnly": True})
    # the trust bundle only: the CA key's Secret is never mounted on nodes
    volumes.append({"name": "ca-root", "configMap": {"name": CA_ROOT_CONFIGMAP}})
    mounts.append({"name": "ca-root", "mountPath": "/etc/ambientmesh/ca-root", "readOnly": True})
    ca_addr = f"ambientmesh-ca.{ns}.svc:{v['ca']['port']}"
    ztunnel_c: Obj = {
        "name": "ztunnel",
        "image": _image(v),
        "imagePullPolicy": v["image"]["pullPolicy"],
        "command": ["ztunnel"],
        "args": [
            "--node",
            "$(NODE_NAME)",
            "--kube",
            "--trust-domain",
            v["trustDomain"],
            "--ca-address",
            ca_addr,
            "--ca-token",
            "/var/run/secrets/tokens/ca-token",
            "--ca-bundle",
            "/etc/ambientmesh/ca-root/root-cert.pem",
            "--redirect",
            "bpf",
            "--enrol-socket",
            f"{ENROL_SOCKET_DIR}/enrol.sock",
            "--log-level",
            v["logLevel"],
            *zt["extraArgs"],
        ],
        "env": [
            _env_field("NODE_NAME", "spec.nodeName"),
            _env_field("POD_NAME", "metadata.name"),
            _env_field("POD_NAMESPACE", "metadata.namespace"),
            # finds ztunnel's own cgroup in the host's tree (private cgroup namespaces)
            _env_field("POD_UID", "metadata.uid"),
        ],
        "ports": [
            {"name": "hbone", "containerPort": HBONE_PORT, "protocol": "TCP"},
            {"name": "http-metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
            {"name": "http-ready", "containerPort": READINESS_PORT, "protocol": "TCP"},
        ],
        **_probes(),
        "resources": copy.deepcopy(zt["resources"]),
        "securityContext": _security(privileged=True),
        "volumeMounts": mounts,
    }
    install_c: Obj = {
        "name": "install-cni",
        "image": _image(v),
        "imagePullPolicy": v["image"]["pullPolicy"],
        "command": ["python3", "-m", "cni.install"],
        "args": [
            "--bin-dir",
            "/host/opt/cni/bin",
            "--conf-dir",
            "/host/etc/cni/net.d",
            "--enrol-socket",
            f"{ENROL_SOCKET_DIR}/enrol.sock",
            "--exclude-namespaces",
            ",".join([*cni["excludeNamespaces"], ns]),
        ],
        "resources": copy.deepcopy(cni["resources"]),
        # writes root-owned host files; needs no capabilities beyond root
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"], "add": ["CHOWN", "DAC_OVERRIDE", "FOWNER"]},
        },
        "volumeMounts": [
            {"name": "cni-bin", "mountPath": "/host/opt/cni/bin"},
            {"name": "cni-conf", "mountPath": "/host/etc/cni/net.d"},
        ],
    }
    ds: Obj = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _meta(name, ns, name),
        "spec": {
            "selector": {"matchLabels": _labels(name)},
            "updateStrategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": zt["maxUnavailable"]},
            },
            "template": {
                "metadata": {
                    "labels": _labels(name),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(METRICS_PORT),
                    },
                },
                "spec": {
                    "serviceAccountName": name,
                    "hostNetwork": True,
                    # the node's pids: ztunnel.inpod.discover finds pods that were running before
                    # the install in /proc; in the pod's own pid namespace it would see none
                    "hostPID": True,
                    "dnsPolicy": "ClusterFirstWithHostNet",
                    "priorityClassName": "system-node-critical",
                    "terminationGracePeriodSeconds": 30,
                    "tolerations": [{"operator": "Exists"}],
                    "nodeSelector": {"kubernetes.io/os": "linux"},
                    "containers": [ztunnel_c, install_c],
                    "volumes": volumes,
                },
            },
        },
    }
    rules = [
        _rule([""], ["namespaces", "pods", "services", "nodes"], READ),
        _rule(["discovery.k8s.io"], ["endpointslices"], READ),
        _rule(["gateway.networking.k8s.io"], ["gateways", "httproutes"], READ),
        _rule(["security.istio.io"], ["authorizationpolicies", "peerauthentications"], READ),
    ]
    return [_sa(name, ns, name), *_rbac(f"ambientmesh-{name}", name, ns, rules), ds]


def _ca(v: Mapping[str, Any]) -> list[Obj]:
    ns = v["namespace"]
    name = "ambientmesh-ca"
    ca = v["ca"]
    dep: Obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, ns, name),
        "spec": {
            "replicas": ca["replicas"],
            "selector": {"matchLabels": _labels(name)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                "metadata": {"labels": _labels(name)},
                "spec": {
                    "serviceAccountName": name,
                    "affinity": {
                        "podAntiAffinity": {
                            "preferredDuringSchedulingIgnoredDuringExecution": [
                                {
                                    "weight": 100,
                                    "podAffinityTerm": {
                                        "topologyKey": "kubernetes.io/hostname",
                                        "labelSelector": {"matchLabels": _labels(name)},
                                    },
                                }
                            ]
                        }
                    },
                    "containers": [
                        {
                            "name": "ca",
                            "image": _image(v),
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
                            **_probes(),
                            "resources": copy.deepcopy(ca["resources"]),
                            "securityContext": _security(),
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
        "metadata": _meta(name, ns, name),
        "spec": {
            "selector": _labels(name),
            "ports": [
                {"name": "grpc-ca", "port": ca["port"], "targetPort": ca["port"], "protocol": "TCP"}
            ],
        },
    }
    rules = [
        _rule(["authentication.k8s.io"], ["tokenreviews"], ["create"]),
        # placement checks: is a pod of this service account on the caller's node?
        _rule([""], ["pods"], ["get", "list"]),
    ]
    return [
        _sa(name, ns, name),
        *_rbac(name, name, ns, rules),
        dep,
        svc,
        _pdb(name, ns, name, minAvailable=1),
    ]


def _controller(v: Mapping[str, Any]) -> list[Obj]:
    ns = v["namespace"]
    name = "waypoint-controller"
    c = v["controller"]
    dep: Obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, ns, name),
        "spec": {
            "replicas": c["replicas"],
            "selector": {"matchLabels": _labels(name)},
            "template": {
                "metadata": {"labels": _labels(name)},
                "spec": {
                    "serviceAccountName": name,
                    "containers": [
                        {
                            "name": "controller",
                            "image": _image(v),
                            "imagePullPolicy": v["image"]["pullPolicy"],
                            "command": ["python3", "-m", "controller.waypoint"],
                            "args": [
                                "--image",
                                _image(v),
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
                            **_probes(),
                            "resources": copy.deepcopy(c["resources"]),
                            "securityContext": _security(),
                        }
                    ],
                },
            },
        },
    }
    rules = [
        _rule(["gateway.networking.k8s.io"], ["gateways"], READ),
        _rule(["gateway.networking.k8s.io"], ["gateways/status"], ["get", "update", "patch"]),
        _rule(["apps"], ["deployments"], [*READ, "create", "update", "patch", "delete"]),
        _rule(
            [""], ["services", "serviceaccounts"], [*READ, "create", "update", "patch", "delete"]
        ),
        # the trust bundle: read from the mesh's namespace, copied beside each waypoint
        _rule([""], ["configmaps"], [*READ, "create", "update", "patch", "delete"]),
    ]
    return [
        _sa(name, ns, name),
        *_rbac(f"ambientmesh-{name}", name, ns, rules),
        dep,
        _pdb(name, ns, name, maxUnavailable=1),
    ]


# -- CRDs ------------------------------------------------------------------------------------


def _s(desc: str = "", **kw: Any) -> Obj:
    out: Obj = {"type": "string", **kw}
    if desc:
        out["description"] = desc
    return out


def _strs(desc: str = "") -> Obj:
    out: Obj = {"type": "array", "items": {"type": "string"}}
    if desc:
        out["description"] = desc
    return out


def _o(props: Mapping[str, Obj], desc: str = "", **kw: Any) -> Obj:
    out: Obj = {"type": "object", "properties": dict(props), **kw}
    if desc:
        out["description"] = desc
    return out


def _selector() -> Obj:
    return _o(
        {
            "matchLabels": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "maxProperties": 4096,
            }
        },
        "Criteria used to select the specific set of pods/VMs on which this policy applies.",
    )


def _target_ref() -> Obj:
    return _o(
        {
            "group": _s("group is the group of the target resource.", maxLength=253),
            "kind": _s("kind is kind of the target resource.", maxLength=63, minLength=1),
            "name": _s("name is the name of the target resource.", maxLength=253, minLength=1),
            "namespace": _s("namespace is the namespace of the referent."),
        },
        "A policy target reference.",
        required=["kind", "name"],
    )


def _authz_spec() -> Obj:
    source = _o(
        {
            k: _strs()
            for k in (
                "principals",
                "notPrincipals",
                "requestPrincipals",
                "notRequestPrincipals",
                "namespaces",
                "notNamespaces",
                "ipBlocks",
                "notIpBlocks",
                "remoteIpBlocks",
                "notRemoteIpBlocks",
                "serviceAccounts",
                "notServiceAccounts",
            )
        },
        "Source specifies the source of a request.",
    )
    operation = _o(
        {
            k: _strs()
            for k in (
                "hosts",
                "notHosts",
                "ports",
                "notPorts",
                "methods",
                "notMethods",
                "paths",
                "notPaths",
            )
        },
        "Operation specifies the operation of a request.",
    )
    rule = _o(
        {
            "from": {"type": "array", "items": _o({"source": source})},
            "to": {"type": "array", "items": _o({"operation": operation})},
            "when": {
                "type": "array",
                "items": _o(
                    {"key": _s(), "values": _strs(), "notValues": _strs()}, required=["key"]
                ),
            },
        }
    )
    return _o(
        {
            "action": _s("Optional.", enum=["ALLOW", "DENY", "AUDIT", "CUSTOM"]),
            "provider": _o(
                {"name": _s()}, "Specifies detailed configuration of the CUSTOM action."
            ),
            "rules": {"type": "array", "items": rule, "maxItems": 512, "description": "Optional."},
            "selector": _selector(),
            "targetRef": _target_ref(),
            "targetRefs": {"type": "array", "items": _target_ref(), "maxItems": 16},
        },
        "Configuration for access control on workloads.",
    )


def _peer_spec() -> Obj:
    mode = _s(
        "Defines the mTLS mode used for peer authentication.",
        enum=["UNSET", "DISABLE", "PERMISSIVE", "STRICT"],
    )
    return _o(
        {
            "mtls": _o({"mode": mode}, "Mutual TLS settings for workload."),
            "portLevelMtls": {
                "type": "object",
                "description": "Port specific mutual TLS settings.",
                "additionalProperties": _o({"mode": mode}),
                "minProperties": 1,
            },
            "selector": _selector(),
        },
        "Peer authentication configuration for workloads.",
    )


def _crd(kind: str, plural: str, spec: Obj, short: list[str], columns: list[Obj]) -> Obj:
    schema = {
        "openAPIV3Schema": _o(
            {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"type": "object"},
                "spec": spec,
                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            }
        )
    }
    versions = []
    for name, storage in (("v1", False), ("v1beta1", True)):
        versions.append(
            {
                "name": name,
                "served": True,
                "storage": storage,
                "schema": copy.deepcopy(schema),
                "subresources": {"status": {}},
                "additionalPrinterColumns": copy.deepcopy(columns),
            }
        )
    names: Obj = {
        "kind": kind,
        "listKind": f"{kind}List",
        "plural": plural,
        "singular": kind.lower(),
        "categories": ["istio-io", "security-istio-io"],
    }
    if short:
        names["shortNames"] = short
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.security.istio.io",
            "labels": {"app.kubernetes.io/part-of": "ambientmesh"},
        },
        "spec": {
            "group": "security.istio.io",
            "scope": "Namespaced",
            "names": names,
            "versions": versions,
        },
    }


def crds() -> list[Obj]:
    age = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    return [
        _crd(
            "AuthorizationPolicy",
            "authorizationpolicies",
            _authz_spec(),
            [],
            [
                {
                    "name": "Action",
                    "type": "string",
                    "jsonPath": ".spec.action",
                    "description": "The operation to take.",
                },
                age,
            ],
        ),
        _crd(
            "PeerAuthentication",
            "peerauthentications",
            _peer_spec(),
            ["pa"],
            [
                {
                    "name": "Mode",
                    "type": "string",
                    "jsonPath": ".spec.mtls.mode",
                    "description": "Defines the mTLS mode used for peer authentication.",
                },
                age,
            ],
        ),
    ]


# -- render ----------------------------------------------------------------------------------


def render(values: Mapping[str, Any] | None = None) -> list[Obj]:
    """Every object of an installation, in apply order (CRDs and namespace first)."""
    v = merge_values(DEFAULT_VALUES, values or {})
    objs: list[Obj] = []
    if v["crds"]["install"]:
        objs += crds()
    objs.append(_namespace(v))
    objs += _ca(v)
    objs += _ztunnel(v)
    objs += _controller(v)
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
    p.set_defaults(func=_cmd_install)
