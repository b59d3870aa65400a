"""The ztunnel DaemonSet (with the CNI installer beside it) and its read-only RBAC."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from mesh.ports import FLOWS_PORT, HBONE_PORT, METRICS_PORT, READINESS_PORT
from meshctl.errors import UsageError
from meshctl.install.objects import (
    CA_ROOT_CONFIGMAP,
    ENROL_SOCKET_DIR,
    READ,
    env_field,
    image,
    labels,
    meta,
    probes,
    rbac,
    rule,
    security_context,
    service_account,
)
from meshctl.install.values import Obj


def objects(v: Mapping[str, Any]) -> list[Obj]:
    ns = v["namespace"]
    name = "ztunnel"
    volumes, mounts = _volumes(v)
    containers = [_ztunnel_container(v, mounts), _install_cni_container(v)]
    return [
        service_account(name, ns, name),
        *rbac(f"ambientmesh-{name}", name, ns, _RULES),
        _daemonset(v, containers, volumes),
    ]


def _volumes(v: Mapping[str, Any]) -> tuple[list[Obj], list[Obj]]:
    """The host paths ztunnel works on (bpffs, cgroup v2, the netns dir, the enrolment
    socket's dir, kernel modules and headers for BCC), the CNI dirs the installer writes,
    the CA token and the trust bundle: (volumes, ztunnel's mounts)."""
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
    return volumes, mounts


def flows_port(v: Mapping[str, Any]) -> int | None:
    """`observe.flowsPort`: the port ztunnel serves /flows on to the network, None for off
    (0, false, off); `on`/true is the default port. Anything else is refused, not guessed."""
    p = v["observe"]["flowsPort"]
    if p is None or p is False or p == 0 or p == "off":
        return None
    if p is True or p == "on":
        return FLOWS_PORT
    if isinstance(p, int) and 1 <= p <= 65535:
        return p
    raise UsageError(f"observe.flowsPort {p!r}: expected a port (1-65535), or 0/off")


def _ztunnel_container(v: Mapping[str, Any], mounts: list[Obj]) -> Obj:
    ns = v["namespace"]
    zt = v["ztunnel"]
    ca_addr = f"ambientmesh-ca.{ns}.svc:{v['ca']['port']}"
    fport = flows_port(v)
    flows_args = ["--flows-addr", f"0.0.0.0:{fport}"] if fport is not None else []
    flows_ports = (
        [{"name": "http-flows", "containerPort": fport, "protocol": "TCP"}]
        if fport is not None
        else []
    )
    return {
        "name": "ztunnel",
        "image": image(v),
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
            *flows_args,
            *zt["extraArgs"],
        ],
        "env": [
            env_field("NODE_NAME", "spec.nodeName"),
            env_field("POD_NAME", "metadata.name"),
            env_field("POD_NAMESPACE", "metadata.namespace"),
            # finds ztunnel's own cgroup in the host's tree (private cgroup namespaces)
            env_field("POD_UID", "metadata.uid"),
        ],
        "ports": [
            {"name": "hbone", "containerPort": HBONE_PORT, "protocol": "TCP"},
            {"name": "http-metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
            {"name": "http-ready", "containerPort": READINESS_PORT, "protocol": "TCP"},
            *flows_ports,
        ],
        **probes(),
        "resources": copy.deepcopy(zt["resources"]),
        "securityContext": security_context(privileged=True),
        "volumeMounts": mounts,
    }


def _install_cni_container(v: Mapping[str, Any]) -> Obj:
    """Keeps the CNI plugin installed and chained beside ztunnel (cni.install)."""
    ns = v["namespace"]
    cni = v["cni"]
    return {
        "name": "install-cni",
        "image": image(v),
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


def _daemonset(v: Mapping[str, Any], containers: list[Obj], volumes: list[Obj]) -> Obj:
    zt = v["ztunnel"]
    ns = v["namespace"]
    name = "ztunnel"
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": meta(name, ns, name),
        "spec": {
            "selector": {"matchLabels": labels(name)},
            "updateStrategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": zt["maxUnavailable"]},
            },
            "template": {
                "metadata": {
                    "labels": labels(name),
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
                    "containers": containers,
                    "volumes": volumes,
                },
            },
        },
    }


_RULES = [
    rule([""], ["namespaces", "pods", "services", "nodes"], READ),
    rule(["discovery.k8s.io"], ["endpointslices"], READ),
    rule(["gateway.networking.k8s.io"], ["gateways", "httproutes", "grpcroutes"], READ),
    rule(["security.istio.io"], ["authorizationpolicies", "peerauthentications"], READ),
    rule(["networking.k8s.io"], ["networkpolicies"], READ),
    rule(["cilium.io"], ["ciliumnetworkpolicies"], READ),
]
