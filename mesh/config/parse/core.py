"""The core kinds: Namespace, Node, Pod, Service, and the Gateway that declares a waypoint."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mesh.config.model import (
    WAYPOINT_GATEWAY_CLASS,
    ConfigError,
    Namespace,
    Node,
    Pod,
    Service,
    ServicePort,
    Waypoint,
)
from mesh.config.parse.common import _DNS1123_LABEL, _DNS1123_SUBDOMAIN, _meta
from mesh.ports import HBONE_PORT

# -- core kinds --------------------------------------------------------------------------------


def _namespace(doc: Mapping[str, Any], errors: list[ConfigError]) -> Namespace | None:
    m = _meta(doc, "Namespace", errors, namespaced=False)
    if m is None:
        return None
    ctx, _, name, meta = m
    if not _DNS1123_LABEL.match(name):
        ctx.err("metadata.name", f"{name!r} is not a valid DNS-1123 label")
    return Namespace(name, ctx.labels(meta.get("labels"), "metadata.labels"))


def _node(doc: Mapping[str, Any], errors: list[ConfigError]) -> Node | None:
    m = _meta(doc, "Node", errors, namespaced=False)
    if m is None:
        return None
    ctx, _, name, _ = m
    status = ctx.mapping(doc.get("status"), "status")
    address = None
    for i, a in enumerate(ctx.seq(status.get("addresses"), "status.addresses")):
        a = ctx.mapping(a, f"status.addresses[{i}]")
        if a.get("type") == "InternalIP":
            address = ctx.ipv4(a.get("address"), f"status.addresses[{i}].address")
            break
    return Node(name, address)


def _pod(doc: Mapping[str, Any], errors: list[ConfigError]) -> Pod | None:
    m = _meta(doc, "Pod", errors, namespaced=True)
    if m is None:
        return None
    ctx, ns, name, meta = m
    spec = ctx.mapping(doc.get("spec"), "spec")
    status = ctx.mapping(doc.get("status"), "status")
    node = ctx.string(spec.get("nodeName"), "spec.nodeName")
    sa = ctx.string(spec.get("serviceAccountName"), "spec.serviceAccountName", "default")
    if sa is None or not _DNS1123_SUBDOMAIN.match(sa):
        ctx.err("spec.serviceAccountName", f"{sa!r} is not a valid DNS-1123 name")
        sa = "default"
    ip = ctx.ipv4(status["podIP"], "status.podIP") if status.get("podIP") else None
    ready = True
    for i, c in enumerate(ctx.seq(status.get("conditions"), "status.conditions")):
        c = ctx.mapping(c, f"status.conditions[{i}]")
        if c.get("type") == "Ready":
            ready = str(c.get("status")) == "True"
    command: tuple[str, ...] = ()
    containers = ctx.seq(spec.get("containers"), "spec.containers")
    if containers:
        c0 = ctx.mapping(containers[0], "spec.containers[0]")
        command = ctx.strings(c0.get("command"), "spec.containers[0].command") + ctx.strings(
            c0.get("args"), "spec.containers[0].args"
        )
    uid = ctx.string(meta.get("uid"), "metadata.uid", "") or ""
    return Pod(
        ns,
        name,
        ip,
        node,
        sa,
        ctx.labels(meta.get("labels"), "metadata.labels"),
        ready,
        command,
        uid,
    )


def _service(doc: Mapping[str, Any], errors: list[ConfigError]) -> Service | None:
    m = _meta(doc, "Service", errors, namespaced=True)
    if m is None:
        return None
    ctx, ns, name, meta = m
    if not _DNS1123_LABEL.match(name):
        ctx.err("metadata.name", f"{name!r} is not a valid DNS-1123 label")
    spec = ctx.mapping(doc.get("spec"), "spec")
    cip = spec.get("clusterIP")
    cluster_ip = None if cip in (None, "None", "") else ctx.ipv4(cip, "spec.clusterIP")
    ports: list[ServicePort] = []
    seen: set[int] = set()
    for i, p in enumerate(ctx.seq(spec.get("ports"), "spec.ports")):
        path = f"spec.ports[{i}]"
        p = ctx.mapping(p, path)
        port = ctx.port(p.get("port"), f"{path}.port")
        tp = p.get("targetPort", port)
        target: int | str | None
        if tp is None:
            target = None  # defaults to an invalid port, already reported
        elif isinstance(tp, str) and not tp.isdigit():
            if not _DNS1123_LABEL.match(tp) or len(tp) > 15:
                ctx.err(f"{path}.targetPort", f"{tp!r} is not a valid port name")
                target = None
            else:
                target = tp
        else:
            target = ctx.port(int(tp) if isinstance(tp, str) else tp, f"{path}.targetPort")
        pname = ctx.string(p.get("name"), f"{path}.name", "") or ""
        proto = ctx.string(p.get("protocol"), f"{path}.protocol", "TCP") or "TCP"
        if proto not in ("TCP", "UDP", "SCTP"):
            ctx.err(f"{path}.protocol", "must be TCP, UDP or SCTP")
        app = ctx.string(p.get("appProtocol"), f"{path}.appProtocol", "") or ""
        if port is None or target is None:
            continue
        if port in seen:
            ctx.err(f"{path}.port", f"duplicate port {port}")
            continue
        seen.add(port)
        ports.append(ServicePort(port, target, pname, proto, app))
    selector = ctx.labels(spec.get("selector"), "spec.selector")
    return Service(
        ns,
        name,
        cluster_ip,
        tuple(sorted(ports, key=lambda sp: sp.port)),
        selector,
        ctx.labels(meta.get("labels"), "metadata.labels"),
    )


def _gateway(doc: Mapping[str, Any], errors: list[ConfigError]) -> Waypoint | None:
    m = _meta(doc, "Gateway", errors, namespaced=True)
    if m is None:
        return None
    ctx, ns, name, _ = m
    spec = ctx.mapping(doc.get("spec"), "spec")
    if spec.get("gatewayClassName") != WAYPOINT_GATEWAY_CLASS:
        return None  # other classes belong to other controllers
    port = HBONE_PORT
    for i, li in enumerate(ctx.seq(spec.get("listeners"), "spec.listeners")):
        li = ctx.mapping(li, f"spec.listeners[{i}]")
        if li.get("protocol") == "HBONE":
            p = ctx.port(li.get("port", HBONE_PORT), f"spec.listeners[{i}].port")
            port = p if p is not None else HBONE_PORT
            break
    return Waypoint(ns, name, port)
