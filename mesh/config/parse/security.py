"""Istio security kinds: AuthorizationPolicy (sources, operations, `when` conditions, the
dry-run annotation), RequestAuthentication (JWT issuers and their keys), PeerAuthentication
(the mTLS mode), and the ConfigMaps a JWKS may be read from.

Strict as Istio's validating webhook: unknown fields, wildcards anywhere but at an end, bad
CIDRs and unknown `when` keys are errors naming the object and the field, because a policy
read differently from how it was written is a hole (or a wall) nobody asked for."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from mesh.config.model import (
    AuthorizationPolicy,
    ConfigError,
    ConfigMap,
    JwtHeader,
    JwtRule,
    MtlsMode,
    PeerAuthentication,
    PolicyAction,
    PolicyCondition,
    PolicyOperation,
    PolicyRule,
    PolicySource,
    PolicyTargetRef,
    RequestAuthentication,
)
from mesh.config.parse.common import _HEADER_NAME, _Ctx, _meta
from mesh.jwt import JwtError, parse_jwks

# -- Istio security ----------------------------------------------------------------------------

DRY_RUN_ANNOTATION = "istio.io/dry-run"

_SPEC_KEYS = ("selector", "targetRef", "targetRefs", "action", "rules", "provider")
_RULE_KEYS = ("from", "to", "when")
_SOURCE_KEYS = (
    "principals",
    "notPrincipals",
    "requestPrincipals",
    "notRequestPrincipals",
    "namespaces",
    "notNamespaces",
    "ipBlocks",
    "notIpBlocks",
)
_SOURCE_UNSUPPORTED = (
    "remoteIpBlocks",
    "notRemoteIpBlocks",
    "serviceAccounts",
    "notServiceAccounts",
)
_OPERATION_KEYS: tuple[str, ...] = ("hosts", "notHosts", "ports", "notPorts", "methods")
_OPERATION_KEYS += ("notMethods", "paths", "notPaths")
_CONDITION_KEYS = ("key", "values", "notValues")
# `when` keys: plain ones, and those taking a [name] (claims may nest: [a][b]).
_WHEN_PLAIN = frozenset(
    [
        "source.ip",
        "source.namespace",
        "source.principal",
        "destination.port",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
    ]
)
_WHEN_UNSUPPORTED = frozenset(
    ["remote.ip", "destination.ip", "connection.sni", "source.serviceAccount"]
)
_BRACKETS = re.compile(r"\[([^\[\]]+)\]")


def _unknown(ctx: _Ctx, m: Mapping[str, Any], path: str, known: tuple[str, ...]) -> None:
    """Istio's API server refuses unknown fields; so do we, naming each."""
    for k in m:
        if k not in known:
            ctx.err(f"{path}.{k}" if path else str(k), "is not a known field")


def _globs(ctx: _Ctx, v: Any, path: str) -> tuple[str, ...]:
    """Istio's string match values: exact, `prefix*`, `*suffix`, or `*` (present)."""
    out = ctx.strings(v, path)
    for i, s in enumerate(out):
        if not s:
            ctx.err(f"{path}[{i}]", "must not be empty")
        elif (
            "*" in s.strip("*")
            or s.startswith("**")
            or s.endswith("**")
            or (s.startswith("*") and s.endswith("*") and s != "*")
        ):
            ctx.err(f"{path}[{i}]", f"{s!r}: '*' is allowed only as a prefix or a suffix")
    return out


def _principals(ctx: _Ctx, v: Any, path: str) -> tuple[str, ...]:
    out = _globs(ctx, v, path)
    for i, s in enumerate(out):
        if s.startswith("spiffe://"):
            ctx.err(f"{path}[{i}]", "write principals without 'spiffe://' (Istio's form)")
    return out


def _paths(ctx: _Ctx, v: Any, path: str) -> tuple[str, ...]:
    out = _globs(ctx, v, path)
    for i, s in enumerate(out):
        if s and not s.startswith(("/", "*")):
            ctx.err(f"{path}[{i}]", f"{s!r} must start with '/' (or be a '*' wildcard)")
        elif "{" in s or "}" in s:
            # Istio's path templates ({*}, {**}): read as an exact path they would match
            # nothing the author meant, so they are refused rather than misread.
            ctx.err(f"{path}[{i}]", f"{s!r}: path templates ({{*}}, {{**}}) are not supported")
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
        if isinstance(s, bool):
            ctx.err(f"{path}[{i}]", f"{s!r} is not a port")
            continue
        try:
            n = int(s)
        except (TypeError, ValueError):
            ctx.err(f"{path}[{i}]", f"{s!r} is not a port")
            continue
        p = ctx.port(n, f"{path}[{i}]")
        if p is not None:
            out.append(p)
    return tuple(out)


def _condition(ctx: _Ctx, raw: Any, p: str) -> PolicyCondition | None:
    c = ctx.mapping(raw, p)
    _unknown(ctx, c, p, _CONDITION_KEYS)
    key = ctx.string(c.get("key"), f"{p}.key")
    if not key:
        ctx.err(f"{p}.key", "is required")
        return None
    base, _, rest = key.partition("[")
    names: tuple[str, ...] = ()
    if rest:
        rest = "[" + rest
        names = tuple(_BRACKETS.findall(rest))
        if not names or "".join(f"[{n}]" for n in names) != rest:
            ctx.err(f"{p}.key", f"{key!r}: brackets must each hold a name, as in [x-user]")
            return None
    if base in _WHEN_UNSUPPORTED:
        ctx.err(f"{p}.key", f"{key!r} is not supported by this mesh")
        return None
    if base == "request.headers":
        if len(names) != 1:
            ctx.err(f"{p}.key", f"{key!r}: write request.headers[<header-name>]")
            return None
        names = (names[0].lower(),)
    elif base == "request.auth.claims":
        if not names:
            ctx.err(f"{p}.key", f"{key!r}: write request.auth.claims[<claim>] ([a][b] nests)")
            return None
    elif base in _WHEN_PLAIN:
        if names:
            ctx.err(f"{p}.key", f"{key!r}: {base} takes no [name]")
            return None
    else:
        ctx.err(f"{p}.key", f"{key!r} is not a known attribute")
        return None
    values, not_values = c.get("values"), c.get("notValues")
    if not values and not not_values:
        ctx.err(p, "must set values or notValues")
        return None
    vals: list[tuple[str, ...]] = []
    for field_name, v in (("values", values), ("notValues", not_values)):
        fp = f"{p}.{field_name}"
        if base == "source.ip":
            vals.append(_cidrs(ctx, v, fp))
        elif base == "destination.port":
            vals.append(tuple(str(n) for n in _policy_ports(ctx, v, fp)))
        elif base == "source.principal":
            vals.append(_principals(ctx, v, fp))
        else:
            vals.append(_globs(ctx, v, fp))
    return PolicyCondition(key, vals[0], vals[1], names)


def _target_refs(
    ctx: _Ctx, spec: Mapping[str, Any], ns: str, root_namespace: str
) -> tuple[PolicyTargetRef, ...]:
    refs = []
    raw_refs = ctx.seq(spec.get("targetRefs"), "spec.targetRefs")
    ref_path = "spec.targetRefs"
    if spec.get("targetRef") is not None:
        if raw_refs:
            ctx.err("spec.targetRef", "must not be set together with targetRefs")
        raw_refs = [spec["targetRef"]]
        ref_path = "spec.targetRef"
    for i, t in enumerate(raw_refs):
        tp = f"{ref_path}[{i}]" if ref_path == "spec.targetRefs" else ref_path
        t = ctx.mapping(t, tp)
        _unknown(ctx, t, tp, ("group", "kind", "name", "namespace"))
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
    return tuple(refs)


def _selector(ctx: _Ctx, spec: Mapping[str, Any]) -> Mapping[str, str] | None:
    if spec.get("selector") is None:
        return None
    sel = ctx.mapping(spec["selector"], "spec.selector")
    _unknown(ctx, sel, "spec.selector", ("matchLabels",))
    return ctx.labels(sel.get("matchLabels"), "spec.selector.matchLabels")


def _authz(
    doc: Mapping[str, Any], errors: list[ConfigError], root_namespace: str
) -> AuthorizationPolicy | None:
    m = _meta(doc, "AuthorizationPolicy", errors, namespaced=True)
    if m is None:
        return None
    ctx, ns, name, meta = m
    spec = ctx.mapping(doc.get("spec"), "spec")
    _unknown(ctx, spec, "spec", _SPEC_KEYS)
    act = spec.get("action", "ALLOW")
    if act == "CUSTOM":
        ctx.err(
            "spec.action",
            "CUSTOM is not supported: this mesh has no external authorizer (ext_authz); "
            "use ALLOW, DENY or AUDIT",
        )
        action = PolicyAction.ALLOW
    else:
        try:
            action = PolicyAction(act)
        except ValueError:
            ctx.err("spec.action", f"{act!r} must be ALLOW, DENY or AUDIT")
            action = PolicyAction.ALLOW
    if "provider" in spec and act != "CUSTOM":
        ctx.err("spec.provider", "is only for action CUSTOM")
    annotations = ctx.mapping(meta.get("annotations"), "metadata.annotations")
    dry = annotations.get(DRY_RUN_ANNOTATION)
    if dry is not None and str(dry).lower() not in ("true", "false"):
        ctx.err(f"metadata.annotations.{DRY_RUN_ANNOTATION}", 'must be "true" or "false"')
    dry_run = str(dry).lower() == "true"
    rules = []
    for i, r in enumerate(ctx.seq(spec.get("rules"), "spec.rules")):
        p = f"spec.rules[{i}]"
        r = ctx.mapping(r, p)
        _unknown(ctx, r, p, _RULE_KEYS)
        sources = []
        for j, f in enumerate(ctx.seq(r.get("from"), f"{p}.from")):
            fm = ctx.mapping(f, f"{p}.from[{j}]")
            _unknown(ctx, fm, f"{p}.from[{j}]", ("source",))
            fp = f"{p}.from[{j}].source"
            s = ctx.mapping(fm.get("source"), fp)
            for unsupported in _SOURCE_UNSUPPORTED:
                if unsupported in s:
                    ctx.err(f"{fp}.{unsupported}", "is not supported by this mesh")
            _unknown(ctx, s, fp, _SOURCE_KEYS + _SOURCE_UNSUPPORTED)
            sources.append(
                PolicySource(
                    _principals(ctx, s.get("principals"), f"{fp}.principals"),
                    _principals(ctx, s.get("notPrincipals"), f"{fp}.notPrincipals"),
                    _globs(ctx, s.get("namespaces"), f"{fp}.namespaces"),
                    _globs(ctx, s.get("notNamespaces"), f"{fp}.notNamespaces"),
                    _cidrs(ctx, s.get("ipBlocks"), f"{fp}.ipBlocks"),
                    _cidrs(ctx, s.get("notIpBlocks"), f"{fp}.notIpBlocks"),
                    _globs(ctx, s.get("requestPrincipals"), f"{fp}.requestPrincipals"),
                    _globs(ctx, s.get("notRequestPrincipals"), f"{fp}.notRequestPrincipals"),
                )
            )
        ops = []
        for j, t in enumerate(ctx.seq(r.get("to"), f"{p}.to")):
            tm = ctx.mapping(t, f"{p}.to[{j}]")
            _unknown(ctx, tm, f"{p}.to[{j}]", ("operation",))
            tp = f"{p}.to[{j}].operation"
            o = ctx.mapping(tm.get("operation"), tp)
            _unknown(ctx, o, tp, _OPERATION_KEYS)
            ops.append(
                PolicyOperation(
                    _policy_ports(ctx, o.get("ports"), f"{tp}.ports"),
                    _policy_ports(ctx, o.get("notPorts"), f"{tp}.notPorts"),
                    _globs(ctx, o.get("methods"), f"{tp}.methods"),
                    _globs(ctx, o.get("notMethods"), f"{tp}.notMethods"),
                    _paths(ctx, o.get("paths"), f"{tp}.paths"),
                    _paths(ctx, o.get("notPaths"), f"{tp}.notPaths"),
                    _globs(ctx, o.get("hosts"), f"{tp}.hosts"),
                    _globs(ctx, o.get("notHosts"), f"{tp}.notHosts"),
                )
            )
        conds = []
        for j, c in enumerate(ctx.seq(r.get("when"), f"{p}.when")):
            cond = _condition(ctx, c, f"{p}.when[{j}]")
            if cond is not None:
                conds.append(cond)
        rules.append(PolicyRule(tuple(sources), tuple(ops), tuple(conds)))
    selector = _selector(ctx, spec)
    refs = _target_refs(ctx, spec, ns, root_namespace)
    if selector is not None and refs:
        ctx.err("spec.selector", "must not be set together with targetRefs")
    return AuthorizationPolicy(ns, name, action, tuple(rules), selector, refs, dry_run=dry_run)


# -- RequestAuthentication ---------------------------------------------------------------------

_JWT_RULE_KEYS = (
    "issuer",
    "audiences",
    "jwksUri",
    "jwks",
    "fromHeaders",
    "fromParams",
    "forwardOriginalToken",
    "outputPayloadToHeader",
)
_JWT_UNSUPPORTED = ("fromCookies", "outputClaimToHeaders", "timeout")
JWKS_URI_SCHEMES = ("file://", "configmap://")


def _request_authn(
    doc: Mapping[str, Any], errors: list[ConfigError], root_namespace: str
) -> RequestAuthentication | None:
    m = _meta(doc, "RequestAuthentication", errors, namespaced=True)
    if m is None:
        return None
    ctx, ns, name, _ = m
    spec = ctx.mapping(doc.get("spec"), "spec")
    _unknown(ctx, spec, "spec", ("selector", "targetRef", "targetRefs", "jwtRules"))
    rules = []
    issuers: set[str] = set()
    for i, raw in enumerate(ctx.seq(spec.get("jwtRules"), "spec.jwtRules")):
        p = f"spec.jwtRules[{i}]"
        r = ctx.mapping(raw, p)
        for k in _JWT_UNSUPPORTED:
            if k in r:
                ctx.err(f"{p}.{k}", "is not supported by this mesh")
        _unknown(ctx, r, p, _JWT_RULE_KEYS + _JWT_UNSUPPORTED)
        issuer = ctx.string(r.get("issuer"), f"{p}.issuer")
        if not issuer:
            ctx.err(f"{p}.issuer", "is required")
            continue
        if issuer in issuers:
            ctx.err(f"{p}.issuer", f"{issuer!r} appears in two jwtRules")
        issuers.add(issuer)
        jwks = ctx.string(r.get("jwks"), f"{p}.jwks")
        uri = ctx.string(r.get("jwksUri"), f"{p}.jwksUri")
        if (jwks is None) == (uri is None):
            ctx.err(p, "must set exactly one of jwks and jwksUri (no OIDC discovery here)")
        if jwks is not None:
            try:
                parse_jwks(jwks)
            except JwtError as exc:
                ctx.err(f"{p}.jwks", str(exc))
        if uri is not None:
            if not uri.startswith(JWKS_URI_SCHEMES):
                ctx.err(
                    f"{p}.jwksUri",
                    f"{uri!r}: only file:///path and configmap://<namespace>/<name>/<key> "
                    "are read (the mesh never fetches keys over the network)",
                )
            elif uri.startswith("configmap://") and len(uri[12:].split("/")) != 3:
                ctx.err(f"{p}.jwksUri", f"{uri!r}: write configmap://<namespace>/<name>/<key>")
        headers = []
        for j, h in enumerate(ctx.seq(r.get("fromHeaders"), f"{p}.fromHeaders")):
            hp = f"{p}.fromHeaders[{j}]"
            hm = ctx.mapping(h, hp)
            _unknown(ctx, hm, hp, ("name", "prefix"))
            hname = ctx.string(hm.get("name"), f"{hp}.name")
            if not hname or not _HEADER_NAME.match(hname):
                ctx.err(f"{hp}.name", "must be a header name")
                continue
            prefix = ctx.string(hm.get("prefix"), f"{hp}.prefix", "") or ""
            headers.append(JwtHeader(hname.lower(), prefix))
        params = ctx.strings(r.get("fromParams"), f"{p}.fromParams")
        fwd = r.get("forwardOriginalToken", False)
        if not isinstance(fwd, bool):
            ctx.err(f"{p}.forwardOriginalToken", "must be a boolean")
            fwd = False
        out_hdr = ctx.string(r.get("outputPayloadToHeader"), f"{p}.outputPayloadToHeader")
        if out_hdr is not None and not _HEADER_NAME.match(out_hdr):
            ctx.err(f"{p}.outputPayloadToHeader", "must be a header name")
            out_hdr = None
        rules.append(
            JwtRule(
                issuer,
                ctx.strings(r.get("audiences"), f"{p}.audiences"),
                jwks,
                uri,
                tuple(headers),
                params,
                fwd,
                out_hdr.lower() if out_hdr else None,
            )
        )
    selector = _selector(ctx, spec)
    refs = _target_refs(ctx, spec, ns, root_namespace)
    if selector is not None and refs:
        ctx.err("spec.selector", "must not be set together with targetRefs")
    return RequestAuthentication(ns, name, tuple(rules), selector, refs)


def configmap_refs(authns: Iterable[RequestAuthentication]) -> set[tuple[str, str]]:
    """(namespace, name) of every ConfigMap a jwksUri names."""
    out = set()
    for ra in authns:
        for r in ra.rules:
            if r.jwks_uri is not None and r.jwks_uri.startswith("configmap://"):
                parts = r.jwks_uri[len("configmap://") :].split("/")
                if len(parts) == 3:
                    out.add((parts[0], parts[1]))
    return out


def _config_map(doc: Mapping[str, Any], errors: list[ConfigError]) -> ConfigMap | None:
    """Only string data is kept (JWKS documents); binaryData is not ours to read."""
    m = _meta(doc, "ConfigMap", errors, namespaced=True)
    if m is None:
        return None
    ctx, ns, name, _ = m
    data: dict[str, str] = {}
    for k, v in ctx.mapping(doc.get("data"), "data").items():
        if isinstance(v, str):
            data[str(k)] = v
        else:
            ctx.err(f"data.{k}", "must be a string")
    return ConfigMap(ns, name, MappingProxyType(data))


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
