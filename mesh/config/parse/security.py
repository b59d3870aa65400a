"""Istio security kinds: AuthorizationPolicy (principals, namespaces, CIDRs, ports) and
PeerAuthentication (the mTLS mode)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from mesh.config.model import (
    AuthorizationPolicy,
    ConfigError,
    MtlsMode,
    PeerAuthentication,
    PolicyAction,
    PolicyOperation,
    PolicyRule,
    PolicySource,
    PolicyTargetRef,
)
from mesh.config.parse.common import _Ctx, _meta

# -- Istio security ----------------------------------------------------------------------------


def _principals(ctx: _Ctx, v: Any, path: str) -> tuple[str, ...]:
    out = ctx.strings(v, path)
    for i, s in enumerate(out):
        if s.startswith("spiffe://"):
            ctx.err(f"{path}[{i}]", "write principals without 'spiffe://' (Istio's form)")
        elif s == "*" or s.startswith("*") or s.endswith("*"):
            if "*" in s.strip("*") or s == "**":
                ctx.err(f"{path}[{i}]", "'*' is allowed only as a prefix or a suffix")
        elif "*" in s:
            ctx.err(f"{path}[{i}]", "'*' is allowed only as a prefix or a suffix")
        elif not s:
            ctx.err(f"{path}[{i}]", "must not be empty")
    return out


def _cidrs(ctx: _Ctx, v: Any, path: str) -> tuple[str, ...]:
    out = []
    for i, s in enumerate(ctx.strings(v, path)):
        try:
            out.append(str(ipaddress.ip_network(s, strict=False)))
        except ValueError:
            ctx.err(f"{path}[{i}]", f"{s!r} is not an IP address or CIDR")
    return tuple(out)


def _policy_ports(ctx: _Ctx, v: Any, path: str) -> tuple[int, ...]:
    out = []
    for i, s in enumerate(ctx.seq(v, path)):
        try:
            n = int(s)
        except (TypeError, ValueError):
            ctx.err(f"{path}[{i}]", f"{s!r} is not a port")
            continue
        p = ctx.port(n, f"{path}[{i}]")
        if p is not None:
            out.append(p)
    return tuple(out)


def _authz(
    doc: Mapping[str, Any], errors: list[ConfigError], root_namespace: str
) -> AuthorizationPolicy | None:
    m = _meta(doc, "AuthorizationPolicy", errors, namespaced=True)
    if m is None:
        return None
    ctx, ns, name, _ = m
    spec = ctx.mapping(doc.get("spec"), "spec")
    act = spec.get("action", "ALLOW")
    if act in ("AUDIT", "CUSTOM"):
        ctx.err("spec.action", f"{act} is not supported")
        action = PolicyAction.ALLOW
    else:
        try:
            action = PolicyAction(act)
        except ValueError:
            ctx.err("spec.action", "must be ALLOW or DENY")
            action = PolicyAction.ALLOW
    rules = []
    for i, r in enumerate(ctx.seq(spec.get("rules"), "spec.rules")):
        p = f"spec.rules[{i}]"
        r = ctx.mapping(r, p)
        if r.get("when"):
            ctx.err(f"{p}.when", "is not supported")
        sources = []
        for j, f in enumerate(ctx.seq(r.get("from"), f"{p}.from")):
            fp = f"{p}.from[{j}].source"
            s = ctx.mapping(ctx.mapping(f, f"{p}.from[{j}]").get("source"), fp)
            for unsupported in ("requestPrincipals", "notRequestPrincipals", "remoteIpBlocks"):
                if unsupported in s:
                    ctx.err(f"{fp}.{unsupported}", "is not supported")
            sources.append(
                PolicySource(
                    _principals(ctx, s.get("principals"), f"{fp}.principals"),
                    _principals(ctx, s.get("notPrincipals"), f"{fp}.notPrincipals"),
                    ctx.strings(s.get("namespaces"), f"{fp}.namespaces"),
                    ctx.strings(s.get("notNamespaces"), f"{fp}.notNamespaces"),
                    _cidrs(ctx, s.get("ipBlocks"), f"{fp}.ipBlocks"),
                    _cidrs(ctx, s.get("notIpBlocks"), f"{fp}.notIpBlocks"),
                )
            )
        ops = []
        for j, t in enumerate(ctx.seq(r.get("to"), f"{p}.to")):
            tp = f"{p}.to[{j}].operation"
            o = ctx.mapping(ctx.mapping(t, f"{p}.to[{j}]").get("operation"), tp)
            ops.append(
                PolicyOperation(
                    _policy_ports(ctx, o.get("ports"), f"{tp}.ports"),
                    _policy_ports(ctx, o.get("notPorts"), f"{tp}.notPorts"),
                    ctx.strings(o.get("methods"), f"{tp}.methods"),
                    ctx.strings(o.get("notMethods"), f"{tp}.notMethods"),
                    ctx.strings(o.get("paths"), f"{tp}.paths"),
                    ctx.strings(o.get("notPaths"), f"{tp}.notPaths"),
                    ctx.strings(o.get("hosts"), f"{tp}.hosts"),
                    ctx.strings(o.get("notHosts"), f"{tp}.notHosts"),
                )
            )
        rules.append(PolicyRule(tuple(sources), tuple(ops)))
    selector = None
    if spec.get("selector") is not None:
        sel = ctx.mapping(spec["selector"], "spec.selector")
        selector = ctx.labels(sel.get("matchLabels"), "spec.selector.matchLabels")
    refs = []
    raw_refs = ctx.seq(spec.get("targetRefs"), "spec.targetRefs")
    ref_path = "spec.targetRefs"
    if spec.get("targetRef") is not None:
        raw_refs = [spec["targetRef"]]
        ref_path = "spec.targetRef"
    for i, t in enumerate(raw_refs):
        tp = f"{ref_path}[{i}]" if ref_path == "spec.targetRefs" else ref_path
        t = ctx.mapping(t, tp)
        kind = t.get("kind")
        if kind not in ("Gateway", "Service", "GatewayClass"):
            ctx.err(f"{tp}.kind", "must be Gateway, Service or GatewayClass")
            continue
        if kind == "GatewayClass" and ns != root_namespace:
            ctx.err(f"{tp}.kind", "GatewayClass is allowed only in the root namespace")
            continue
        tname = ctx.dns_label(t.get("name"), f"{tp}.name")
        if tname:
            refs.append(PolicyTargetRef(kind, tname, str(t.get("group", ""))))
    if selector is not None and refs:
        ctx.err("spec.selector", "must not be set together with targetRefs")
    return AuthorizationPolicy(ns, name, action, tuple(rules), selector, tuple(refs))


def _mtls_mode(ctx: _Ctx, v: Any, path: str) -> MtlsMode:
    m = ctx.mapping(v, path)
    mode = m.get("mode", "UNSET")
    try:
        return MtlsMode(mode)
    except ValueError:
        ctx.err(f"{path}.mode", "must be UNSET, PERMISSIVE, STRICT or DISABLE")
        return MtlsMode.UNSET


def _peer_authn(doc: Mapping[str, Any], errors: list[ConfigError]) -> PeerAuthentication | None:
    m = _meta(doc, "PeerAuthentication", errors, namespaced=True)
    if m is None:
        return None
    ctx, ns, name, _ = m
    spec = ctx.mapping(doc.get("spec"), "spec")
    selector = None
    if spec.get("selector") is not None:
        sel = ctx.mapping(spec["selector"], "spec.selector")
        selector = ctx.labels(sel.get("matchLabels"), "spec.selector.matchLabels")
    mode = _mtls_mode(ctx, spec.get("mtls"), "spec.mtls")
    port_modes: dict[int, MtlsMode] = {}
    for k, v in ctx.mapping(spec.get("portLevelMtls"), "spec.portLevelMtls").items():
        path = f"spec.portLevelMtls.{k}"
        try:
            port = int(k)
        except (TypeError, ValueError):
            ctx.err(path, f"{k!r} is not a port")
            continue
        if ctx.port(port, path) is not None:
            port_modes[port] = _mtls_mode(ctx, v, path)
    if port_modes and selector is None:
        ctx.err("spec.portLevelMtls", "requires spec.selector")
    return PeerAuthentication(
        ns, name, mode, selector, MappingProxyType(dict(sorted(port_modes.items())))
    )
