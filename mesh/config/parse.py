"""Raw Kubernetes-style objects → a validated `Snapshot`.

Both config sources (YAML files, a Kubernetes watch) hand raw dicts to `parse_objects`, so
validation lives once and a bad object never reaches the data path. Every problem of a load is
collected, not just the first, because an operator fixing a manifest wants the whole list.
File handling lives only in `load_snapshot`, keeping `parse_objects` usable by any source.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from mesh.config.model import (
    DEFAULT_ROOT_NAMESPACE,
    DEFAULT_TRUST_DOMAIN,
    WAYPOINT_GATEWAY_CLASS,
    AuthorizationPolicy,
    BackendRef,
    ConfigError,
    FilterType,
    HeaderModifier,
    HTTPRoute,
    MtlsMode,
    Namespace,
    Node,
    ParentRef,
    PathMatch,
    PathMatchType,
    PathModifier,
    PathModifierType,
    PeerAuthentication,
    Pod,
    PolicyAction,
    PolicyOperation,
    PolicyRule,
    PolicySource,
    PolicyTargetRef,
    RequestMirror,
    RequestRedirect,
    RouteFilter,
    RouteMatch,
    RouteRetry,
    RouteRule,
    RouteTimeouts,
    Service,
    ServicePort,
    URLRewrite,
    ValueMatch,
    ValueMatchType,
    Waypoint,
)
from mesh.config.snapshot import Snapshot
from mesh.ports import HBONE_PORT

__all__ = ["ConfigErrors", "load_snapshot", "parse_duration", "parse_objects"]


class ConfigErrors(ConfigError):
    """Every problem found in one load. `errors` holds each `ConfigError`; the message lists
    them one per line so a CLI can print it as is."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        self.errors: tuple[ConfigError, ...] = tuple(errors)
        first = self.errors[0] if self.errors else ConfigError("config", "", "invalid")
        super().__init__(first.obj, first.field_path, first.problem)
        self.args = ("\n".join(str(e) for e in self.errors),)

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")
_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_DURATION_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_METHODS = frozenset(
    ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]
)
_REDIRECT_CODES = frozenset([301, 302, 303, 307, 308])


def parse_duration(text: str) -> float:
    """A Gateway API duration ("10s", "500ms", "1h2m") in seconds; ValueError if malformed."""
    if not isinstance(text, str) or not _DURATION.match(text):
        raise ValueError(f"invalid duration {text!r} (want e.g. 10s, 500ms, 1h2m)")
    unit = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(int(n) * unit[u] for n, u in _DURATION_PART.findall(text))


class _Ctx:
    """Error collection for one object: `err(field, problem)` records and carries on."""

    def __init__(self, obj: str, errors: list[ConfigError]) -> None:
        self.obj = obj
        self.errors = errors

    def err(self, path: str, problem: str) -> None:
        self.errors.append(ConfigError(self.obj, path, problem))

    # Typed accessors: a wrong type is an error and returns the fallback.
    def mapping(self, v: Any, path: str) -> Mapping[str, Any]:
        if v is None:
            return {}
        if not isinstance(v, Mapping):
            self.err(path, "must be a mapping")
            return {}
        return v

    def seq(self, v: Any, path: str) -> list[Any]:
        if v is None:
            return []
        if not isinstance(v, list):
            self.err(path, "must be a list")
            return []
        return v

    def string(self, v: Any, path: str, default: str | None = None) -> str | None:
        if v is None:
            return default
        if not isinstance(v, str):
            self.err(path, "must be a string")
            return default
        return v

    def strings(self, v: Any, path: str) -> tuple[str, ...]:
        out = []
        for i, s in enumerate(self.seq(v, path)):
            x = self.string(s, f"{path}[{i}]")
            if x is not None:
                out.append(x)
        return tuple(out)

    def port(self, v: Any, path: str) -> int | None:
        if isinstance(v, bool) or not isinstance(v, int):
            self.err(path, "must be an integer port")
            return None
        if not 1 <= v <= 65535:
            self.err(path, "must be between 1 and 65535")
            return None
        return v

    def ipv4(self, v: Any, path: str) -> str | None:
        s = self.string(v, path)
        if s is None:
            return None
        try:
            ipaddress.IPv4Address(s)
        except ValueError:
            self.err(path, f"{s!r} is not an IPv4 address")
            return None
        return s

    def dns_label(self, v: Any, path: str) -> str | None:
        s = self.string(v, path)
        if s is None:
            self.err(path, "is required")
            return None
        if len(s) > 63 or not _DNS1123_LABEL.match(s):
            self.err(path, f"{s!r} is not a valid DNS-1123 label")
            return None
        return s

    def labels(self, v: Any, path: str) -> Mapping[str, str]:
        out: dict[str, str] = {}
        for k, val in self.mapping(v, path).items():
            key = str(k)
            name = key.rsplit("/", 1)[-1]
            prefix = key[: -len(name) - 1] if "/" in key else ""
            if not name or len(name) > 63 or not _LABEL_NAME.match(name):
                self.err(f"{path}.{key}", "is not a valid label name")
                continue
            if prefix and not _DNS1123_SUBDOMAIN.match(prefix):
                self.err(f"{path}.{key}", "has an invalid label prefix")
                continue
            if isinstance(val, bool) or val is None:
                self.err(f"{path}.{key}", "must be a string")
                continue
            sval = str(val)
            if len(sval) > 63 or not _LABEL_VALUE.match(sval):
                self.err(f"{path}.{key}", f"{sval!r} is not a valid label value")
                continue
            out[key] = sval
        return MappingProxyType(dict(sorted(out.items())))


def _meta(
    doc: Mapping[str, Any], kind: str, errors: list[ConfigError], namespaced: bool
) -> tuple[_Ctx, str, str, Mapping[str, Any]] | None:
    meta = doc.get("metadata")
    if not isinstance(meta, Mapping):
        errors.append(ConfigError(kind, "metadata", "must be a mapping"))
        return None
    name = meta.get("name")
    ns = meta.get("namespace", "default") if namespaced else ""
    if not isinstance(ns, str):
        ns = str(ns)
    label = f"{kind} {ns}/{name}" if namespaced else f"{kind} {name}"
    ctx = _Ctx(label, errors)
    if not isinstance(name, str) or not name:
        ctx.err("metadata.name", "is required")
        return None
    if len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        ctx.err("metadata.name", f"{name!r} is not a valid DNS-1123 name")
    if namespaced and (len(ns) > 63 or not _DNS1123_LABEL.match(ns)):
        ctx.err("metadata.namespace", f"{ns!r} is not a valid DNS-1123 label")
    return ctx, ns, name, meta


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


def _filters(ctx: _Ctx, v: Any, path: str, ns: str) -> tuple[RouteFilter, ...]:
    out = []
    for i, f in enumerate(ctx.seq(v, path)):
        p = f"{path}[{i}]"
        f = ctx.mapping(f, p)
        try:
            typ = FilterType(f.get("type"))
        except ValueError:
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


def _backend(ctx: _Ctx, v: Any, path: str, ns: str, *, filters: bool) -> BackendRef | None:
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
    fl = _filters(ctx, b.get("filters"), f"{path}.filters", ns) if filters else ()
    if name is None or bns is None:
        return None
    return BackendRef(name, bns, port, weight, fl)


def _http_route(doc: Mapping[str, Any], errors: list[ConfigError]) -> HTTPRoute | None:
    m = _meta(doc, "HTTPRoute", errors, namespaced=True)
    if m is None:
        return None
    ctx, ns, name, meta = m
    spec = ctx.mapping(doc.get("spec"), "spec")
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
    hostnames = ctx.strings(spec.get("hostnames"), "spec.hostnames")
    for i, h in enumerate(hostnames):
        bare = h[2:] if h.startswith("*.") else h
        if len(h) > 253 or not _DNS1123_SUBDOMAIN.match(bare):
            ctx.err(f"spec.hostnames[{i}]", f"{h!r} is not a valid hostname")
    rules = []
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
                ctx.string(r.get("name"), f"{p}.name", "") or "",
            )
        )
    created = meta.get("creationTimestamp", "")
    return HTTPRoute(ns, name, tuple(parents), hostnames, tuple(rules), str(created or ""))


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


# -- assembly ----------------------------------------------------------------------------------

_GW_GROUP = "gateway.networking.k8s.io/"
_SEC_GROUP = "security.istio.io/"


MAX_LIST_DEPTH = 8


def _flatten(
    docs: Iterable[Any], errors: list[ConfigError], depth: int = 0
) -> Iterator[Mapping[str, Any]]:
    """Documents with `kind: List` expanded. YAML anchors can make a List contain itself,
    and nesting has no natural bound: both stop at MAX_LIST_DEPTH with an error."""
    for d in docs:
        if d is None:
            continue
        if isinstance(d, Mapping) and d.get("kind") == "List" and isinstance(d.get("items"), list):
            if depth >= MAX_LIST_DEPTH:
                why = f"Lists nest deeper than {MAX_LIST_DEPTH} (or a List contains itself)"
                errors.append(ConfigError("List", "items", why))
                continue
            yield from _flatten(d["items"], errors, depth + 1)
        else:
            yield d


def parse_objects(
    docs: Iterable[Mapping[str, Any]],
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    version: int = 0,
) -> Snapshot:
    """Validate raw objects and build a Snapshot; raise `ConfigErrors` listing every problem.

    Kinds we do not model (ConfigMap, Deployment, …) are skipped: the same manifests go to
    `kubectl apply`, and they are not ours to judge.
    """
    errors: list[ConfigError] = []
    nodes: list[Node] = []
    namespaces: list[Namespace] = []
    pods: list[Pod] = []
    services: list[Service] = []
    waypoints: list[Waypoint] = []
    routes: list[HTTPRoute] = []
    policies: list[AuthorizationPolicy] = []
    peers: list[PeerAuthentication] = []
    seen: set[tuple[str, str]] = set()
    for i, doc in enumerate(_flatten(docs, errors)):
        if not isinstance(doc, Mapping):
            errors.append(ConfigError(f"document {i}", "", "must be a mapping"))
            continue
        kind = doc.get("kind")
        api = str(doc.get("apiVersion", ""))
        obj: Any = None
        if kind == "Namespace" and api == "v1":
            obj = _namespace(doc, errors)
            bucket: list[Any] = namespaces
        elif kind == "Pod" and api == "v1":
            obj, bucket = _pod(doc, errors), pods
        elif kind == "Service" and api == "v1":
            obj, bucket = _service(doc, errors), services
        elif kind == "Node" and api == "v1":
            obj, bucket = _node(doc, errors), nodes
        elif kind == "Gateway" and api.startswith(_GW_GROUP):
            obj, bucket = _gateway(doc, errors), waypoints
        elif kind == "HTTPRoute" and api.startswith(_GW_GROUP):
            obj, bucket = _http_route(doc, errors), routes
        elif kind == "AuthorizationPolicy" and api in (_SEC_GROUP + "v1", _SEC_GROUP + "v1beta1"):
            obj, bucket = _authz(doc, errors, root_namespace), policies
        elif kind == "PeerAuthentication" and api in (_SEC_GROUP + "v1", _SEC_GROUP + "v1beta1"):
            obj, bucket = _peer_authn(doc, errors), peers
        else:
            continue
        if obj is None:
            continue
        key = obj.key if hasattr(obj, "key") else obj.name
        ident = (str(kind), key)
        if ident in seen:
            errors.append(ConfigError(f"{kind} {key}", "metadata.name", "is defined twice"))
            continue
        seen.add(ident)
        bucket.append(obj)

    by_ip: dict[str, Pod] = {}
    for pod in sorted(pods, key=lambda p: p.key):
        if pod.ip is None:
            continue
        other = by_ip.get(pod.ip)
        if other is not None:
            errors.append(
                ConfigError(f"Pod {pod.key}", "status.podIP", f"{pod.ip} is also {other.key}'s")
            )
        else:
            by_ip[pod.ip] = pod
    by_vip: dict[tuple[str, int], Service] = {}
    for svc in sorted(services, key=lambda s: s.key):
        if svc.cluster_ip is None:
            continue
        for sp in svc.ports:
            o = by_vip.get((svc.cluster_ip, sp.port))
            if o is not None:
                errors.append(
                    ConfigError(
                        f"Service {svc.key}",
                        "spec.clusterIP",
                        f"{svc.cluster_ip}:{sp.port} is also Service {o.key}'s",
                    )
                )
            else:
                by_vip[(svc.cluster_ip, sp.port)] = svc
    if errors:
        raise ConfigErrors(errors)

    def k(o: Any) -> str:
        return str(o.key)

    return Snapshot(
        trust_domain=trust_domain,
        root_namespace=root_namespace,
        nodes=tuple(sorted(nodes, key=lambda n: n.name)),
        namespaces=tuple(sorted(namespaces, key=lambda n: n.name)),
        pods=tuple(sorted(pods, key=k)),
        services=tuple(sorted(services, key=k)),
        waypoints=tuple(sorted(waypoints, key=k)),
        http_routes=tuple(sorted(routes, key=lambda r: (r.creation_timestamp, r.key))),
        authorization_policies=tuple(sorted(policies, key=k)),
        peer_authentications=tuple(sorted(peers, key=k)),
        version=version,
    )


def _files(paths: Sequence[str | Path]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(x for x in p.rglob("*") if x.suffix in (".yaml", ".yml")))
        else:
            out.append(p)
    return out


def read_documents(paths: Sequence[str | Path]) -> list[Any]:
    """All YAML documents from files/directories; an unreadable or malformed file raises
    `ConfigErrors` naming the file."""
    docs: list[Any] = []
    errors: list[ConfigError] = []
    for f in _files(paths):
        try:
            docs.extend(yaml.safe_load_all(f.read_text()))
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
            errors.append(ConfigError(f"file {f}", "", str(exc).replace("\n", " ")))
        except RecursionError:  # PyYAML's parser recurses once per nesting level
            errors.append(ConfigError(f"file {f}", "", "nests too deeply to be a manifest"))
    if errors:
        raise ConfigErrors(errors)
    return docs


def load_snapshot(
    paths: Sequence[str | Path],
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    version: int = 0,
) -> Snapshot:
    """`parse_objects` over every *.yaml/*.yml under `paths` (multi-document, `kind: List`)."""
    return parse_objects(
        read_documents(paths),
        trust_domain=trust_domain,
        root_namespace=root_namespace,
        version=version,
    )
