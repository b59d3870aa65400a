"""Gateway API HTTPRoute and GRPCRoute: matches, filters (header and path rewrites, redirects,
mirrors) and weighted backends, each field checked as the Gateway API spec words it.

A GRPCRoute is parsed into the HTTPRoute model (see `HTTPRoute`): its method match becomes a
path match on /<service>/<method>, and its filters and backends go through HTTPRoute's own
checks, restricted to the filter types GRPCRoute allows."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from mesh.config.model import (
    BackendRef,
    ConfigError,
    FilterType,
    GRPCMethodMatch,
    HeaderModifier,
    HTTPRoute,
    ParentRef,
    PathMatch,
    PathMatchType,
    PathModifier,
    PathModifierType,
    RequestMirror,
    RequestRedirect,
    RouteFilter,
    RouteMatch,
    RouteRetry,
    RouteRule,
    RouteTimeouts,
    URLRewrite,
    ValueMatch,
    ValueMatchType,
)
from mesh.config.parse.common import (
    _DNS1123_SUBDOMAIN,
    _HEADER_NAME,
    _METHODS,
    _REDIRECT_CODES,
    _Ctx,
    _meta,
    parse_duration,
)

# -- HTTPRoute ---------------------------------------------------------------------------------


def _regex(ctx: _Ctx, v: str, path: str) -> None:
    try:
        re.compile(v)
    except re.error as exc:
        ctx.err(path, f"invalid regular expression: {exc}")


def _value_matches(ctx: _Ctx, v: Any, path: str, header: bool) -> tuple[ValueMatch, ...]:
    out = []
    for i, h in enumerate(ctx.seq(v, path)):
        p = f"{path}[{i}]"
        h = ctx.mapping(h, p)
        name = ctx.string(h.get("name"), f"{p}.name")
        value = ctx.string(h.get("value"), f"{p}.value")
        if name is None or (header and not _HEADER_NAME.match(name)) or not name:
            ctx.err(f"{p}.name", f"{name!r} is not a valid name")
            continue
        if value is None:
            ctx.err(f"{p}.value", "is required")
            continue
        try:
            typ = ValueMatchType(h.get("type", "Exact"))
        except ValueError:
            ctx.err(f"{p}.type", "must be Exact or RegularExpression")
            continue
        if typ is ValueMatchType.REGULAR_EXPRESSION:
            _regex(ctx, value, f"{p}.value")
        out.append(ValueMatch(name.lower() if header else name, value, typ))
    return tuple(out)


def _match(ctx: _Ctx, v: Any, path: str) -> RouteMatch:
    m = ctx.mapping(v, path)
    pm: PathMatch | None = PathMatch()
    if "path" in m:
        pth = ctx.mapping(m["path"], f"{path}.path")
        try:
            typ = PathMatchType(pth.get("type", "PathPrefix"))
        except ValueError:
            ctx.err(f"{path}.path.type", "must be Exact, PathPrefix or RegularExpression")
            typ = PathMatchType.PATH_PREFIX
        value = ctx.string(pth.get("value"), f"{path}.path.value", "/") or "/"
        if typ is PathMatchType.REGULAR_EXPRESSION:
            _regex(ctx, value, f"{path}.path.value")
        elif not value.startswith("/"):
            ctx.err(f"{path}.path.value", "must start with '/'")
        pm = PathMatch(typ, value)
    method = ctx.string(m.get("method"), f"{path}.method")
    if method is not None and method not in _METHODS:
        ctx.err(f"{path}.method", f"{method!r} is not an HTTP method")
    return RouteMatch(
        pm,
        _value_matches(ctx, m.get("headers"), f"{path}.headers", True),
        _value_matches(ctx, m.get("queryParams"), f"{path}.queryParams", False),
        method,
    )


def _header_mod(ctx: _Ctx, v: Any, path: str) -> HeaderModifier:
    m = ctx.mapping(v, path)

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        out = []
        for i, h in enumerate(ctx.seq(m.get(key), f"{path}.{key}")):
            h = ctx.mapping(h, f"{path}.{key}[{i}]")
            n = ctx.string(h.get("name"), f"{path}.{key}[{i}].name")
            val = ctx.string(h.get("value"), f"{path}.{key}[{i}].value", "") or ""
            if not n or not _HEADER_NAME.match(n):
                ctx.err(f"{path}.{key}[{i}].name", f"{n!r} is not a valid header name")
                continue
            out.append((n.lower(), val))
        return tuple(out)

    remove = ctx.strings(m.get("remove"), f"{path}.remove")
    for i, n in enumerate(remove):
        if not _HEADER_NAME.match(n):
            ctx.err(f"{path}.remove[{i}]", f"{n!r} is not a valid header name")
    return HeaderModifier(pairs("set"), pairs("add"), tuple(n.lower() for n in remove))


def _path_mod(ctx: _Ctx, v: Any, path: str) -> PathModifier | None:
    if v is None:
        return None
    m = ctx.mapping(v, path)
    try:
        typ = PathModifierType(m.get("type"))
    except ValueError:
        ctx.err(f"{path}.type", "must be ReplaceFullPath or ReplacePrefixMatch")
        return None
    key = "replaceFullPath" if typ is PathModifierType.REPLACE_FULL_PATH else "replacePrefixMatch"
    value = ctx.string(m.get(key), f"{path}.{key}")
    if value is None:
        ctx.err(f"{path}.{key}", f"is required for type {typ.value}")
        return None
    return PathModifier(typ, value)


_FILTER_FIELD = {
    FilterType.REQUEST_HEADER_MODIFIER: "requestHeaderModifier",
    FilterType.RESPONSE_HEADER_MODIFIER: "responseHeaderModifier",
    FilterType.REQUEST_REDIRECT: "requestRedirect",
    FilterType.URL_REWRITE: "urlRewrite",
    FilterType.REQUEST_MIRROR: "requestMirror",
}


_GRPC_FILTERS = frozenset(
    [
        FilterType.REQUEST_HEADER_MODIFIER,
        FilterType.RESPONSE_HEADER_MODIFIER,
        FilterType.REQUEST_MIRROR,
    ]
)


def _filters(
    ctx: _Ctx, v: Any, path: str, ns: str, allowed: frozenset[FilterType] | None = None
) -> tuple[RouteFilter, ...]:
    out = []
    for i, f in enumerate(ctx.seq(v, path)):
        p = f"{path}[{i}]"
        f = ctx.mapping(f, p)
        try:
            typ = FilterType(f.get("type"))
        except ValueError:
            typ = None
        if typ is None or (allowed is not None and typ not in allowed):
            ctx.err(f"{p}.type", f"unsupported filter type {f.get('type')!r}")
            continue
        want = _FILTER_FIELD[typ]
        for other in _FILTER_FIELD.values():
            if other != want and other in f:
                ctx.err(f"{p}.{other}", f"must not be set for type {typ.value}")
        if want not in f:
            ctx.err(f"{p}.{want}", f"is required for type {typ.value}")
            continue
        body = f[want]
        fp = f"{p}.{want}"
        if typ is FilterType.REQUEST_HEADER_MODIFIER:
            out.append(RouteFilter(typ, request_header_modifier=_header_mod(ctx, body, fp)))
        elif typ is FilterType.RESPONSE_HEADER_MODIFIER:
            out.append(RouteFilter(typ, response_header_modifier=_header_mod(ctx, body, fp)))
        elif typ is FilterType.REQUEST_REDIRECT:
            b = ctx.mapping(body, fp)
            scheme = ctx.string(b.get("scheme"), f"{fp}.scheme")
            if scheme is not None and scheme not in ("http", "https"):
                ctx.err(f"{fp}.scheme", "must be http or https")
            code = b.get("statusCode", 302)
            if code not in _REDIRECT_CODES:
                ctx.err(f"{fp}.statusCode", "must be one of 301, 302, 303, 307, 308")
                code = 302
            port = ctx.port(b["port"], f"{fp}.port") if "port" in b else None
            rr = RequestRedirect(
                scheme,
                ctx.string(b.get("hostname"), f"{fp}.hostname"),
                _path_mod(ctx, b.get("path"), f"{fp}.path"),
                port,
                code,
            )
            out.append(RouteFilter(typ, request_redirect=rr))
        elif typ is FilterType.URL_REWRITE:
            b = ctx.mapping(body, fp)
            uw = URLRewrite(
                ctx.string(b.get("hostname"), f"{fp}.hostname"),
                _path_mod(ctx, b.get("path"), f"{fp}.path"),
            )
            out.append(RouteFilter(typ, url_rewrite=uw))
        else:
            b = ctx.mapping(body, fp)
            ref = _backend(ctx, b.get("backendRef"), f"{fp}.backendRef", ns, filters=False)
            if ref is not None:
                out.append(RouteFilter(typ, request_mirror=RequestMirror(ref)))
    return tuple(out)


def _backend(
    ctx: _Ctx,
    v: Any,
    path: str,
    ns: str,
    *,
    filters: bool,
    allowed: frozenset[FilterType] | None = None,
) -> BackendRef | None:
    b = ctx.mapping(v, path)
    kind = b.get("kind", "Service")
    if kind != "Service" or b.get("group", "") not in ("", "core"):
        ctx.err(f"{path}.kind", "only Service backends are supported")
        return None
    name = ctx.dns_label(b.get("name"), f"{path}.name")
    bns = ctx.dns_label(b.get("namespace", ns), f"{path}.namespace")
    port = ctx.port(b["port"], f"{path}.port") if "port" in b else None
    if "port" not in b:
        ctx.err(f"{path}.port", "is required for a Service backend")
    weight = b.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int):
        ctx.err(f"{path}.weight", "must be an integer")
        weight = 1
    elif weight < 0:
        ctx.err(f"{path}.weight", "must be >= 0")
    elif weight > 1_000_000:
        ctx.err(f"{path}.weight", "must be <= 1000000")
    fl = _filters(ctx, b.get("filters"), f"{path}.filters", ns, allowed) if filters else ()
    if name is None or bns is None:
        return None
    return BackendRef(name, bns, port, weight, fl)


def _parents(ctx: _Ctx, spec: Mapping[str, Any], ns: str) -> tuple[ParentRef, ...]:
    """parentRefs, the same for HTTPRoute and GRPCRoute: a Service (mesh) or a Gateway."""
    parents = []
    for i, pr in enumerate(ctx.seq(spec.get("parentRefs"), "spec.parentRefs")):
        p = f"spec.parentRefs[{i}]"
        pr = ctx.mapping(pr, p)
        kind = pr.get("kind", "Gateway")
        group = pr.get("group", "gateway.networking.k8s.io" if kind == "Gateway" else "")
        if kind == "Service":
            if group not in ("", "core"):
                ctx.err(f"{p}.group", 'must be "" for kind Service')
            group = ""
        elif kind != "Gateway":
            ctx.err(f"{p}.kind", "must be Service or Gateway")
            continue
        pname = ctx.dns_label(pr.get("name"), f"{p}.name")
        pns = ctx.dns_label(pr.get("namespace", ns), f"{p}.namespace")
        port = ctx.port(pr["port"], f"{p}.port") if "port" in pr else None
        if pname and pns:
            parents.append(ParentRef(kind, pname, pns, port, str(group)))
    return tuple(parents)


def _hostnames(ctx: _Ctx, spec: Mapping[str, Any]) -> tuple[str, ...]:
    hostnames = ctx.strings(spec.get("hostnames"), "spec.hostnames")
    for i, h in enumerate(hostnames):
        bare = h[2:] if h.startswith("*.") else h
        if len(h) > 253 or not _DNS1123_SUBDOMAIN.match(bare):
            ctx.err(f"spec.hostnames[{i}]", f"{h!r} is not a valid hostname")
    return hostnames


GRPC_STATUS = {
    name: i
    for i, name in enumerate(
        [
            "OK",
            "CANCELLED",
            "UNKNOWN",
            "INVALID_ARGUMENT",
            "DEADLINE_EXCEEDED",
            "NOT_FOUND",
            "ALREADY_EXISTS",
            "PERMISSION_DENIED",
            "RESOURCE_EXHAUSTED",
            "FAILED_PRECONDITION",
            "ABORTED",
            "OUT_OF_RANGE",
            "UNIMPLEMENTED",
            "INTERNAL",
            "UNAVAILABLE",
            "DATA_LOSS",
            "UNAUTHENTICATED",
        ]
    )
}


def _grpc_retry(ctx: _Ctx, v: Any, p: str) -> RouteRetry:
    """A GRPCRoute rule's retry (our extension, shaped like HTTPRoute's): codes are gRPC
    status names or numbers, since a failed call is an HTTP 200 carrying grpc-status."""
    rt = ctx.mapping(v, p)
    for k in rt:
        if k not in ("attempts", "codes", "backoff"):
            ctx.err(f"{p}.{k}", "is not a field of a GRPCRoute retry")
    attempts = rt.get("attempts", 0)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
        ctx.err(f"{p}.attempts", "must be an integer >= 0")
        attempts = 0
    codes: list[int] = []
    for j, c in enumerate(ctx.seq(rt.get("codes"), f"{p}.codes")):
        code = GRPC_STATUS.get(c) if isinstance(c, str) else c
        if isinstance(code, bool) or not isinstance(code, int) or not 1 <= code <= 16:
            ctx.err(f"{p}.codes[{j}]", f"{c!r} is not a gRPC error status (a name like "
                                       "UNAVAILABLE, or 1-16)")  # fmt: skip
        else:
            codes.append(code)
    if attempts and not codes:
        ctx.err(f"{p}.codes", "is required when attempts > 0: which statuses to retry")
    backoff = 0.025
    if rt.get("backoff") is not None:
        try:
            backoff = parse_duration(rt["backoff"])
        except ValueError as exc:
            ctx.err(f"{p}.backoff", str(exc))
    return RouteRetry(attempts, (), backoff, tuple(codes))


_SECTION_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")


def _rule_name(ctx: _Ctx, r: Mapping[str, Any], p: str, seen: set[str]) -> str:
    """A rule's optional name. Policies and status point at a rule by it, so it must be a
    section name and unique in its route (the CRD enforces both; a file source must too)."""
    name = ctx.string(r.get("name"), f"{p}.name", "") or ""
    if not name:
        return ""
    if len(name) > 253 or not _SECTION_NAME.match(name):
        ctx.err(f"{p}.name", f"{name!r} is not a valid section name (a DNS-1123 subdomain)")
    elif name in seen:
        ctx.err(f"{p}.name", f"{name!r} names an earlier rule of this route too")
    seen.add(name)
    return name


def _http_route(doc: Mapping[str, Any], errors: list[ConfigError]) -> HTTPRoute | None:
    m = _meta(doc, "HTTPRoute", errors, namespaced=True)
    if m is None:
        return None
    ctx, ns, name, meta = m
    spec = ctx.mapping(doc.get("spec"), "spec")
    parents = _parents(ctx, spec, ns)
    hostnames = _hostnames(ctx, spec)
    rules = []
    names: set[str] = set()
    for i, r in enumerate(ctx.seq(spec.get("rules"), "spec.rules")):
        p = f"spec.rules[{i}]"
        r = ctx.mapping(r, p)
        matches = tuple(
            _match(ctx, mm, f"{p}.matches[{j}]")
            for j, mm in enumerate(ctx.seq(r.get("matches"), f"{p}.matches"))
        ) or (RouteMatch(),)
        filters = _filters(ctx, r.get("filters"), f"{p}.filters", ns)
        backends = []
        for j, b in enumerate(ctx.seq(r.get("backendRefs"), f"{p}.backendRefs")):
            ref = _backend(ctx, b, f"{p}.backendRefs[{j}]", ns, filters=True)
            if ref is not None:
                backends.append(ref)
        to = ctx.mapping(r.get("timeouts"), f"{p}.timeouts")
        tvals: dict[str, float | None] = {}
        for key in ("request", "backendRequest"):
            tv = to.get(key)
            tvals[key] = None
            if tv is not None:
                try:
                    d = parse_duration(tv)
                    tvals[key] = d if d > 0 else None
                except ValueError as exc:
                    ctx.err(f"{p}.timeouts.{key}", str(exc))
        rt = ctx.mapping(r.get("retry"), f"{p}.retry")
        attempts = rt.get("attempts", 0)
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
            ctx.err(f"{p}.retry.attempts", "must be an integer >= 0")
            attempts = 0
        codes = []
        for j, c in enumerate(ctx.seq(rt.get("codes"), f"{p}.retry.codes")):
            if isinstance(c, bool) or not isinstance(c, int) or not 400 <= c <= 599:
                ctx.err(f"{p}.retry.codes[{j}]", "must be an HTTP status between 400 and 599")
            else:
                codes.append(c)
        backoff = 0.025
        if rt.get("backoff") is not None:
            try:
                backoff = parse_duration(rt["backoff"])
            except ValueError as exc:
                ctx.err(f"{p}.retry.backoff", str(exc))
        rules.append(
            RouteRule(
                matches,
                filters,
                tuple(backends),
                RouteTimeouts(tvals["request"], tvals["backendRequest"]),
                RouteRetry(attempts, tuple(codes), backoff),
                _rule_name(ctx, r, p, names),
            )
        )
    created = meta.get("creationTimestamp", "")
    return HTTPRoute(ns, name, parents, hostnames, tuple(rules), str(created or ""))


# -- GRPCRoute ---------------------------------------------------------------------------------

# The Gateway API's own patterns for an exact service (a dotted protobuf package + service)
# and method name; RegularExpression values only need to compile.
_GRPC_SERVICE = re.compile(r"(?i)^\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*$")
_GRPC_METHOD = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*$")
_GRPC_MAX = 1024
_ANY_SEGMENT = "[^/]+"


def _grpc_method(ctx: _Ctx, v: Any, path: str) -> tuple[PathMatch, GRPCMethodMatch] | None:
    """A GRPCRoute method match and the path match it is on the wire: /<service>/<method>.
    None (any path) when the match is invalid; the spec requires service, method or both."""
    m = ctx.mapping(v, path)
    for k in m:
        if k not in ("type", "service", "method"):
            ctx.err(f"{path}.{k}", "is not a field of a gRPC method match")
    typ = m.get("type", "Exact")
    if typ not in ("Exact", "RegularExpression"):
        ctx.err(f"{path}.type", "must be Exact or RegularExpression")
        return None
    svc = ctx.string(m.get("service"), f"{path}.service")
    meth = ctx.string(m.get("method"), f"{path}.method")
    if not svc and not meth:
        ctx.err(path, "must set service, method or both")
        return None
    ok = True
    for key, val, pat in (("service", svc, _GRPC_SERVICE), ("method", meth, _GRPC_METHOD)):
        if not val:
            continue
        if len(val) > _GRPC_MAX:
            ctx.err(f"{path}.{key}", f"must be at most {_GRPC_MAX} characters")
            ok = False
        elif typ == "Exact" and not pat.match(val):
            ctx.err(f"{path}.{key}", f"{val!r} is not a valid gRPC {key} name")
            ok = False
        elif typ == "RegularExpression":
            try:
                re.compile(val)
            except re.error as exc:
                ctx.err(f"{path}.{key}", f"invalid regular expression: {exc}")
                ok = False
    if not ok:
        return None
    written = GRPCMethodMatch(ValueMatchType(typ), svc or None, meth or None)
    if typ == "Exact":
        if svc and meth:
            return PathMatch(PathMatchType.EXACT, f"/{svc}/{meth}"), written
        s = re.escape(svc) if svc else _ANY_SEGMENT
        mm = re.escape(meth) if meth else _ANY_SEGMENT
    else:
        s = f"(?:{svc})" if svc else _ANY_SEGMENT
        mm = f"(?:{meth})" if meth else _ANY_SEGMENT
    return PathMatch(PathMatchType.REGULAR_EXPRESSION, f"/{s}/{mm}"), written


def _grpc_match(ctx: _Ctx, v: Any, path: str) -> RouteMatch:
    m = ctx.mapping(v, path)
    for k in m:
        if k not in ("method", "headers"):
            ctx.err(f"{path}.{k}", "is not a field of a GRPCRoute match")
    got = _grpc_method(ctx, m["method"], f"{path}.method") if "method" in m else None
    headers = _value_matches(ctx, m.get("headers"), f"{path}.headers", True)
    if got is None:
        return RouteMatch(PathMatch(), headers)
    return RouteMatch(got[0], headers, grpc_method=got[1])


def _grpc_route(doc: Mapping[str, Any], errors: list[ConfigError]) -> HTTPRoute | None:
    """A GRPCRoute as an `HTTPRoute` of kind GRPCRoute. Gateway API v1 gives it no timeouts
    or retries; the only retry is our own `retry` extension on gRPC status codes."""
    m = _meta(doc, "GRPCRoute", errors, namespaced=True)
    if m is None:
        return None
    ctx, ns, name, meta = m
    spec = ctx.mapping(doc.get("spec"), "spec")
    parents = _parents(ctx, spec, ns)
    hostnames = _hostnames(ctx, spec)
    rules = []
    names: set[str] = set()
    for i, r in enumerate(ctx.seq(spec.get("rules"), "spec.rules")):
        p = f"spec.rules[{i}]"
        r = ctx.mapping(r, p)
        for k in r:
            if k not in ("name", "matches", "filters", "backendRefs", "sessionPersistence",
                         "retry"):  # fmt: skip
                ctx.err(f"{p}.{k}", "is not a field of a GRPCRoute rule")
        matches = tuple(
            _grpc_match(ctx, mm, f"{p}.matches[{j}]")
            for j, mm in enumerate(ctx.seq(r.get("matches"), f"{p}.matches"))
        ) or (RouteMatch(),)
        filters = _filters(ctx, r.get("filters"), f"{p}.filters", ns, _GRPC_FILTERS)
        backends = []
        for j, b in enumerate(ctx.seq(r.get("backendRefs"), f"{p}.backendRefs")):
            ref = _backend(ctx, b, f"{p}.backendRefs[{j}]", ns, filters=True, allowed=_GRPC_FILTERS)
            if ref is not None:
                backends.append(ref)
        rule_name = _rule_name(ctx, r, p, names)
        retry = _grpc_retry(ctx, r.get("retry"), f"{p}.retry")
        rules.append(RouteRule(matches, filters, tuple(backends), retry=retry, name=rule_name))
    created = meta.get("creationTimestamp", "")
    return HTTPRoute(ns, name, parents, hostnames, tuple(rules), str(created or ""), "GRPCRoute")
