"""Policies users bring from Kubernetes and Cilium: NetworkPolicy (networking.k8s.io/v1) and
the CiliumNetworkPolicy (cilium.io/v2) subset of the article's examples.

Anything outside the subset is refused by name ("... is not supported: ...") rather than
skipped: a rule dropped silently would be a hole, or a wall, that the operator never wrote.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from mesh.config.model import (
    CiliumEntity,
    CiliumHTTPRule,
    CiliumNetworkPolicy,
    CiliumPortRule,
    CiliumRule,
    ConfigError,
    NetworkPolicy,
    NetworkPolicyPeer,
    NetworkPolicyPort,
    NetworkPolicyRule,
)
from mesh.config.parse.common import _METHODS, _Ctx, _meta


def _only(ctx: _Ctx, m: Mapping[str, Any], path: str, allowed: tuple[str, ...], why: str) -> None:
    """Refuse every key of `m` not in `allowed`, naming it and what is supported instead."""
    for k in m:
        if k not in allowed:
            ctx.err(f"{path}.{k}" if path else str(k), f"is not supported: {why}")


def _selector(ctx: _Ctx, v: Any, path: str) -> Mapping[str, str]:
    sel = ctx.mapping(v, path)
    _only(ctx, sel, path, ("matchLabels",), "only matchLabels selectors are")
    return ctx.labels(sel.get("matchLabels"), f"{path}.matchLabels")


def _cidr(ctx: _Ctx, v: Any, path: str) -> str | None:
    s = ctx.string(v, path)
    if s is None:
        ctx.err(path, "is required")
        return None
    try:
        return str(ipaddress.ip_network(s, strict=False))
    except ValueError:
        ctx.err(path, f"{s!r} is not a CIDR")
        return None


def _port_number(ctx: _Ctx, v: Any, path: str) -> int | None:
    """A port written as a number or a decimal string (Cilium quotes them); a name is refused."""
    if isinstance(v, str):
        if not (v.isascii() and v.isdigit()):
            ctx.err(path, f"is not supported: named port {v!r} (write the number)")
            return None
        v = int(v)
    return ctx.port(v, path)


# -- Kubernetes NetworkPolicy ------------------------------------------------------------------


def _np_ports(ctx: _Ctx, v: Any, path: str) -> tuple[NetworkPolicyPort, ...]:
    out = []
    for i, raw in enumerate(ctx.seq(v, path)):
        p = f"{path}[{i}]"
        m = ctx.mapping(raw, p)
        _only(ctx, m, p, ("port", "protocol"), "endPort ranges are not modelled")
        proto = ctx.string(m.get("protocol"), f"{p}.protocol", "TCP")
        if proto != "TCP":
            ctx.err(f"{p}.protocol", f"is not supported: {proto!r} (the mesh carries TCP only)")
            continue
        port = None if m.get("port") is None else _port_number(ctx, m["port"], f"{p}.port")
        out.append(NetworkPolicyPort(port))
    return tuple(out)


def _np_peers(ctx: _Ctx, v: Any, path: str) -> tuple[NetworkPolicyPeer, ...]:
    out = []
    for i, raw in enumerate(ctx.seq(v, path)):
        p = f"{path}[{i}]"
        m = ctx.mapping(raw, p)
        _only(ctx, m, p, ("podSelector", "namespaceSelector", "ipBlock"), "unknown peer field")
        if not m:
            ctx.err(p, "must set podSelector, namespaceSelector or ipBlock")
            continue
        if "ipBlock" in m:
            if "podSelector" in m or "namespaceSelector" in m:
                ctx.err(f"{p}.ipBlock", "must not be set together with a selector")
                continue
            b = ctx.mapping(m["ipBlock"], f"{p}.ipBlock")
            _only(ctx, b, f"{p}.ipBlock", ("cidr", "except"), "unknown ipBlock field")
            cidr = _cidr(ctx, b.get("cidr"), f"{p}.ipBlock.cidr")
            exc = []
            for j, e in enumerate(ctx.seq(b.get("except"), f"{p}.ipBlock.except")):
                c = _cidr(ctx, e, f"{p}.ipBlock.except[{j}]")
                if c is not None:
                    exc.append(c)
            if cidr is not None:
                out.append(NetworkPolicyPeer(ip_block=cidr, ip_block_except=tuple(exc)))
            continue
        pods = _selector(ctx, m["podSelector"], f"{p}.podSelector") if "podSelector" in m else None
        nss = (
            _selector(ctx, m["namespaceSelector"], f"{p}.namespaceSelector")
            if "namespaceSelector" in m
            else None
        )
        out.append(NetworkPolicyPeer(pods, nss))
    return tuple(out)


def _network_policy(doc: Mapping[str, Any], errors: list[ConfigError]) -> NetworkPolicy | None:
    m = _meta(doc, "NetworkPolicy", errors, namespaced=True)
    if m is None:
        return None
    ctx, ns, name, _ = m
    spec = ctx.mapping(doc.get("spec"), "spec")
    _only(ctx, spec, "spec", ("podSelector", "policyTypes", "ingress", "egress"), "unknown field")
    if "podSelector" not in spec:
        ctx.err("spec.podSelector", "is required ({} selects every pod)")
    pod_selector = _selector(ctx, spec.get("podSelector"), "spec.podSelector")
    rules: dict[str, list[NetworkPolicyRule]] = {"ingress": [], "egress": []}
    for direction, peer_key in (("ingress", "from"), ("egress", "to")):
        for i, raw in enumerate(ctx.seq(spec.get(direction), f"spec.{direction}")):
            p = f"spec.{direction}[{i}]"
            r = ctx.mapping(raw, p)
            _only(ctx, r, p, (peer_key, "ports"), f"a {direction} rule has {peer_key} and ports")
            rules[direction].append(
                NetworkPolicyRule(
                    _np_peers(ctx, r.get(peer_key), f"{p}.{peer_key}"),
                    _np_ports(ctx, r.get("ports"), f"{p}.ports"),
                )
            )
    if "policyTypes" in spec:
        types = ctx.strings(spec["policyTypes"], "spec.policyTypes")
        for i, t in enumerate(types):
            if t not in ("Ingress", "Egress"):
                ctx.err(f"spec.policyTypes[{i}]", f"{t!r} must be Ingress or Egress")
        types = tuple(sorted(set(types) & {"Ingress", "Egress"}, reverse=True))
    else:  # Kubernetes' default: Ingress always, Egress when there are egress rules
        types = ("Ingress", "Egress") if "egress" in spec else ("Ingress",)
    return NetworkPolicy(
        ns, name, pod_selector, types, tuple(rules["ingress"]), tuple(rules["egress"])
    )


# -- CiliumNetworkPolicy -----------------------------------------------------------------------

# A method regex: upper-case letters with regex punctuation, and at least some punctuation
# (a bare word must be a known method).
_METHOD_RE = re.compile(r"^(?=.*[|.*+?()\[\]])[A-Z|.*+?()\[\]^$]+$")
_CNP_SUBSET = "this mesh reads endpointSelector, ingress and egress"
_INGRESS_KEYS = ("fromEndpoints", "toPorts", "authentication")
_EGRESS_KEYS = ("toEndpoints", "toPorts", "toEntities", "toCIDR", "authentication")


def _cnp_to_ports(ctx: _Ctx, v: Any, path: str) -> tuple[CiliumPortRule, ...]:
    out = []
    for i, raw in enumerate(ctx.seq(v, path)):
        p = f"{path}[{i}]"
        m = ctx.mapping(raw, p)
        _only(ctx, m, p, ("ports", "rules"), "toPorts has ports and rules.http")
        ports = []
        for j, pr in enumerate(ctx.seq(m.get("ports"), f"{p}.ports")):
            pp = f"{p}.ports[{j}]"
            pm = ctx.mapping(pr, pp)
            _only(ctx, pm, pp, ("port", "protocol"), "a port has port and protocol")
            proto = ctx.string(pm.get("protocol"), f"{pp}.protocol", "TCP")
            if proto not in ("TCP", "ANY"):
                ctx.err(f"{pp}.protocol", f"is not supported: {proto!r} (TCP only)")
                continue
            if "port" not in pm:
                ctx.err(f"{pp}.port", "is required")
                continue
            n = _port_number(ctx, pm["port"], f"{pp}.port")
            if n is not None:
                ports.append(n)
        http = []
        rules = ctx.mapping(m.get("rules"), f"{p}.rules")
        _only(ctx, rules, f"{p}.rules", ("http",), "only http L7 rules are")
        for j, hr in enumerate(ctx.seq(rules.get("http"), f"{p}.rules.http")):
            hp = f"{p}.rules.http[{j}]"
            hm = ctx.mapping(hr, hp)
            _only(ctx, hm, hp, ("method", "path"), "an http rule matches method and path")
            method = ctx.string(hm.get("method"), f"{hp}.method")
            if method is not None and method not in _METHODS:
                # Cilium's method is an anchored regex too ("GET|HEAD"); a plain word that is
                # no method is a typo, and a regex must compile and name only methods' letters.
                if not _METHOD_RE.match(method):
                    ctx.err(f"{hp}.method", f"{method!r} is not an HTTP method")
                    method = None
                else:
                    try:
                        re.compile(method)
                    except re.error as exc:
                        ctx.err(f"{hp}.method", f"invalid regular expression: {exc}")
                        method = None
            path_re = ctx.string(hm.get("path"), f"{hp}.path")
            if path_re is not None:
                try:
                    re.compile(path_re)
                except re.error as exc:
                    ctx.err(f"{hp}.path", f"invalid regular expression: {exc}")
                    path_re = None
            http.append(CiliumHTTPRule(method, path_re))
        out.append(CiliumPortRule(tuple(ports), tuple(http)))
    return tuple(out)


def _cnp_rules(ctx: _Ctx, v: Any, direction: str) -> tuple[CiliumRule, ...]:
    out = []
    keys = _INGRESS_KEYS if direction == "ingress" else _EGRESS_KEYS
    for i, raw in enumerate(ctx.seq(v, f"spec.{direction}")):
        p = f"spec.{direction}[{i}]"
        r = ctx.mapping(raw, p)
        _only(ctx, r, p, keys, f"a {direction} rule may use {', '.join(keys)}")
        peer_key = "fromEndpoints" if direction == "ingress" else "toEndpoints"
        endpoints = tuple(
            _selector(ctx, e, f"{p}.{peer_key}[{j}]")
            for j, e in enumerate(ctx.seq(r.get(peer_key), f"{p}.{peer_key}"))
        )
        entities = []
        for j, e in enumerate(ctx.strings(r.get("toEntities"), f"{p}.toEntities")):
            try:
                entities.append(CiliumEntity(e))
            except ValueError:
                ctx.err(f"{p}.toEntities[{j}]", f"is not supported: {e!r} (only world)")
        cidrs = []
        for j, c in enumerate(ctx.seq(r.get("toCIDR"), f"{p}.toCIDR")):
            x = _cidr(ctx, c, f"{p}.toCIDR[{j}]")
            if x is not None:
                cidrs.append(x)
        auth = False
        if "authentication" in r:
            a = ctx.mapping(r["authentication"], f"{p}.authentication")
            _only(ctx, a, f"{p}.authentication", ("mode",), "authentication has only mode")
            mode = a.get("mode")
            if mode == "required":
                auth = True
            elif mode != "disabled":
                ctx.err(f"{p}.authentication.mode", "must be required or disabled")
        out.append(
            CiliumRule(
                endpoints,
                tuple(entities),
                tuple(cidrs),
                _cnp_to_ports(ctx, r.get("toPorts"), f"{p}.toPorts"),
                auth,
            )
        )
    return tuple(out)


def _cilium_policy(doc: Mapping[str, Any], errors: list[ConfigError]) -> CiliumNetworkPolicy | None:
    m = _meta(doc, "CiliumNetworkPolicy", errors, namespaced=True)
    if m is None:
        return None
    ctx, ns, name, _ = m
    if "specs" in doc:
        ctx.err("specs", f"is not supported: write one spec per policy ({_CNP_SUBSET})")
    spec = ctx.mapping(doc.get("spec"), "spec")
    _only(ctx, spec, "spec", ("endpointSelector", "ingress", "egress", "description"), _CNP_SUBSET)
    if "endpointSelector" not in spec:
        ctx.err("spec.endpointSelector", "is required ({} selects every endpoint)")
    selector = _selector(ctx, spec.get("endpointSelector"), "spec.endpointSelector")
    ingress = _cnp_rules(ctx, spec["ingress"], "ingress") if "ingress" in spec else None
    egress = _cnp_rules(ctx, spec["egress"], "egress") if "egress" in spec else None
    return CiliumNetworkPolicy(ns, name, selector, ingress, egress)
