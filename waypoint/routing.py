"""Sans-IO HTTPRoute engine: match a request to a rule, apply filters, pick a backend.

GRPCRoutes arrive already compiled into the HTTPRoute model (a method match is a path match on
/<service>/<method>), so they share all of this; the only difference is that a GRPCRoute match
also requires the request to be gRPC (`is_grpc`).

No sockets here: the HTTP/1.1 and HTTP/2 glue hands in (method, path, headers) and gets back a
decision, so every Gateway API precedence and filter rule is unit-tested without I/O. A
``RouteTable`` is compiled once per (snapshot, service) and is immutable, like the snapshot.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from mesh.config.model import (
    BackendRef,
    ConfigError,
    FilterType,
    HeaderModifier,
    HTTPRoute,
    PathMatchType,
    PathModifier,
    PathModifierType,
    RouteFilter,
    RouteMatch,
    RouteRule,
    ValueMatchType,
)

Headers = list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Request:
    """What routing needs of a request. Header names are lower-case."""

    method: str
    path: str  # path only, no query
    query: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    host: str = ""
    scheme: str = "http"
    port: int | None = None

    @staticmethod
    def from_target(
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]] = (),
        host: str = "",
        *,
        lowered: bool = False,
    ) -> Request:
        """`lowered`: the names are lower-case already (a `RequestHead`'s are, by contract),
        so they are not lowered again on every request."""
        path, _, query = target.partition("?")
        hs = tuple(headers) if lowered else tuple((k.lower(), v) for k, v in headers)
        if not host:
            host = next((v for k, v in hs if k == "host"), "")
        return Request(method.upper(), path or "/", query, hs, host)


def is_grpc(headers: Sequence[tuple[str, str]]) -> bool:
    """gRPC over HTTP/2 says so in its content-type: application/grpc, optionally +proto etc."""
    for k, v in headers:
        if k == "content-type":
            ct = v.split(";", 1)[0].strip().lower()
            return ct == "application/grpc" or ct.startswith("application/grpc+")
    return False


def _prefix_matches(prefix: str, path: str) -> bool:
    """PathPrefix matches whole path elements: "/foo" matches "/foo/bar", not "/foobar"."""
    p = prefix.rstrip("/")
    if not p:
        return True
    if not path.startswith(p):
        return False
    return len(path) == len(p) or path[len(p)] == "/"


@dataclass(frozen=True, slots=True)
class _CompiledMatch:
    """A match with its regexes compiled and its precedence key precomputed."""

    route: HTTPRoute
    rule: RouteRule
    rule_index: int
    match: RouteMatch
    path_regex: re.Pattern[str] | None
    header_regexes: tuple[tuple[str, re.Pattern[str] | None, str], ...]
    query_regexes: tuple[tuple[str, re.Pattern[str] | None, str], ...]
    sort_key: tuple[object, ...]
    grpc_only: bool = False

    def matches(self, req: Request, query: Mapping[str, str]) -> bool:
        m = self.match
        if self.grpc_only and not is_grpc(req.headers):
            return False
        if m.method is not None and m.method != req.method:
            return False
        pm = m.path
        if pm is not None:
            if pm.type is PathMatchType.EXACT:
                if req.path != pm.value:
                    return False
            elif pm.type is PathMatchType.PATH_PREFIX:
                if not _prefix_matches(pm.value, req.path):
                    return False
            elif self.path_regex is not None and self.path_regex.fullmatch(req.path) is None:
                return False
        for name, rx, value in self.header_regexes:
            got = [v for k, v in req.headers if k == name]
            if not got:
                return False
            joined = ",".join(got)
            if rx is None:
                if joined != value:
                    return False
            elif rx.fullmatch(joined) is None:
                return False
        for name, rx, value in self.query_regexes:
            qv = query.get(name)
            if qv is None:
                return False
            if rx is None:
                if qv != value:
                    return False
            elif rx.fullmatch(qv) is None:
                return False
        return True


def _precedence(
    route: HTTPRoute, rule_index: int, match_index: int, m: RouteMatch
) -> tuple[object, ...]:
    """Gateway API precedence: smaller sorts first.

    A GRPCRoute's matches come first: they only match gRPC requests, so for those they are the
    more specific (an HTTPRoute catch-all must not shadow them). Then, as the spec orders:
    Exact path > longest PathPrefix > RegularExpression; a method match; more header matches;
    more query matches; oldest route; alphabetical namespace/name; rule order; match order.
    """
    if route.kind == "GRPCRoute":
        # GEP-1016: most characters of an exact service, then of an exact method (a regex
        # counts as a wildcard: no characters), then header matches.
        g = m.grpc_method
        exact = g is not None and g.type is ValueMatchType.EXACT
        path_rank: tuple[int, int] = (
            -len(g.service or "") if g is not None and exact else 0,
            -len(g.method or "") if g is not None and exact else 0,
        )
    elif m.path is None:
        path_rank = (1, 0)
    elif m.path.type is PathMatchType.EXACT:
        path_rank = (0, -len(m.path.value))
    elif m.path.type is PathMatchType.PATH_PREFIX:
        path_rank = (1, -len(m.path.value.rstrip("/")) - 1)
    else:
        path_rank = (2, 0)
    return (
        0 if route.kind == "GRPCRoute" else 1,
        path_rank,
        0 if m.method else 1,
        -len(m.headers),
        -len(m.query_params),
        route.creation_timestamp or "\uffff",
        route.key,
        route.kind,
        rule_index,
        match_index,
    )


class BackendChooser:
    """Weighted choice in O(log n) from precomputed cumulative weights; weight 0 never wins."""

    __slots__ = ("_cum", "refs", "total")

    def __init__(self, refs: Sequence[BackendRef]) -> None:
        self.refs = tuple(r for r in refs if r.weight > 0)
        cum: list[int] = []
        acc = 0
        for r in self.refs:
            acc += r.weight
            cum.append(acc)
        self._cum = cum
        self.total = acc

    def choose(self, rnd: float) -> BackendRef | None:
        """`rnd` in [0, 1); None when every weight is 0 (the caller answers 500)."""
        if self.total == 0:
            return None
        return self.refs[bisect.bisect_right(self._cum, int(rnd * self.total))]


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """The result of routing: either a redirect/direct response or a forward."""

    route: HTTPRoute | None
    rule: RouteRule | None
    matched_prefix: str | None
    chooser: BackendChooser | None


def _regex(route: HTTPRoute, field_path: str, value: str) -> re.Pattern[str]:
    """Compile a match regex; a bad one is a ConfigError naming the route and field."""
    try:
        return re.compile(value)
    except re.error as exc:
        raise ConfigError(
            f"{route.kind} {route.key}", field_path, f"invalid regular expression {value!r}: {exc}"
        ) from exc


class RouteTable:
    """All matches of all routes attached to one Service, in precedence order."""

    def __init__(self, routes: Sequence[HTTPRoute]) -> None:
        compiled: list[_CompiledMatch] = []
        self._choosers: dict[tuple[str, str, int], BackendChooser] = {}
        for route in routes:
            for ri, rule in enumerate(route.rules):
                self._choosers[(route.kind, route.key, ri)] = BackendChooser(rule.backend_refs)
                for mi, m in enumerate(rule.matches):
                    where = f"spec.rules[{ri}].matches[{mi}]"
                    prx = None
                    if m.path is not None and m.path.type is PathMatchType.REGULAR_EXPRESSION:
                        prx = _regex(route, f"{where}.path.value", m.path.value)
                    hdr = tuple(
                        (
                            h.name.lower(),
                            _regex(route, f"{where}.headers[{i}].value", h.value)
                            if h.type is ValueMatchType.REGULAR_EXPRESSION
                            else None,
                            h.value,
                        )
                        for i, h in enumerate(m.headers)
                    )
                    qry = tuple(
                        (
                            q.name,
                            _regex(route, f"{where}.queryParams[{i}].value", q.value)
                            if q.type is ValueMatchType.REGULAR_EXPRESSION
                            else None,
                            q.value,
                        )
                        for i, q in enumerate(m.query_params)
                    )
                    compiled.append(
                        _CompiledMatch(
                            route,
                            rule,
                            ri,
                            m,
                            prx,
                            hdr,
                            qry,
                            _precedence(route, ri, mi, m),
                            route.kind == "GRPCRoute",
                        )
                    )
        compiled.sort(key=lambda c: c.sort_key)
        self._matches = tuple(compiled)
        self._needs_query = any(c.query_regexes for c in compiled)

    def __bool__(self) -> bool:
        return bool(self._matches)

    def route(self, req: Request) -> RouteDecision | None:
        """The winning rule, or None when no route matches (caller uses the Service itself)."""
        query: dict[str, str] = {}
        if self._needs_query and req.query:
            for k, v in parse_qsl(req.query, keep_blank_values=True):
                query.setdefault(k, v)
        for c in self._matches:
            if c.matches(req, query):
                pm = c.match.path
                prefix = (
                    pm.value if pm is not None and pm.type is PathMatchType.PATH_PREFIX else None
                )
                return RouteDecision(
                    c.route,
                    c.rule,
                    prefix,
                    self._choosers[(c.route.kind, c.route.key, c.rule_index)],
                )
        return None


# ---------------------------------------------------------------------------------------------
# Filters


def replace_prefix(path: str, prefix: str, replacement: str) -> str:
    """ReplacePrefixMatch: swap the matched prefix, keeping element boundaries ("/foo" →
    "/xyz" turns "/foo/bar" into "/xyz/bar"; → "/" turns it into "/bar")."""
    p = prefix.rstrip("/")
    rest = path[len(p) :] if _prefix_matches(p, path) else path
    if replacement.endswith("/") and rest.startswith("/"):
        rest = rest[1:]
    out = replacement + rest
    if not out.startswith("/"):
        out = "/" + out
    return out


def _modify_path(mod: PathModifier, path: str, matched_prefix: str | None) -> str:
    if mod.type is PathModifierType.REPLACE_FULL_PATH:
        return mod.value
    return replace_prefix(path, matched_prefix or "/", mod.value)


def modify_headers(headers: Headers, mod: HeaderModifier) -> Headers:
    """Set replaces every value of a name, add appends, remove drops (names case-insensitive)."""
    drop = {n.lower() for n in mod.remove} | {n.lower() for n, _ in mod.set}
    out = [(k, v) for k, v in headers if k.lower() not in drop]
    out.extend((n.lower(), v) for n, v in mod.set)
    for n, v in mod.add:
        ln = n.lower()
        existing = [i for i, (k, _) in enumerate(out) if k.lower() == ln]
        if existing:
            i = existing[-1]
            out[i] = (out[i][0], out[i][1] + "," + v)
        else:
            out.append((ln, v))
    return out


@dataclass(slots=True)
class Redirect:
    status: int
    location: str


@dataclass(slots=True)
class Forward:
    """How to forward: rewritten path/host, modified headers, response modifiers, mirrors."""

    path: str
    query: str
    host: str
    headers: Headers
    response_modifiers: list[HeaderModifier] = field(default_factory=list)
    mirrors: list[BackendRef] = field(default_factory=list)


_DEFAULT_PORTS = {"http": 80, "https": 443}


def apply_filters(
    filters: Sequence[RouteFilter], req: Request, matched_prefix: str | None
) -> Redirect | Forward:
    """Apply a rule's (or backendRef's) filters in order; a RequestRedirect ends routing."""
    fwd = Forward(req.path, req.query, req.host, list(req.headers))
    for f in filters:
        if f.type is FilterType.REQUEST_HEADER_MODIFIER and f.request_header_modifier:
            fwd.headers = modify_headers(fwd.headers, f.request_header_modifier)
        elif f.type is FilterType.RESPONSE_HEADER_MODIFIER and f.response_header_modifier:
            fwd.response_modifiers.append(f.response_header_modifier)
        elif f.type is FilterType.URL_REWRITE and f.url_rewrite:
            if f.url_rewrite.hostname:
                fwd.host = f.url_rewrite.hostname
            if f.url_rewrite.path:
                fwd.path = _modify_path(f.url_rewrite.path, fwd.path, matched_prefix)
        elif f.type is FilterType.REQUEST_MIRROR and f.request_mirror:
            fwd.mirrors.append(f.request_mirror.backend)
        elif f.type is FilterType.REQUEST_REDIRECT and f.request_redirect:
            rr = f.request_redirect
            scheme = rr.scheme or req.scheme
            host_in, _, port_in = req.host.partition(":")
            host = rr.hostname or host_in
            if rr.port is not None:
                port: int | None = rr.port
            elif rr.scheme is not None:
                port = None  # scheme changed without a port: the scheme's default
            else:
                port = int(port_in) if port_in.isdigit() else req.port
            path = _modify_path(rr.path, req.path, matched_prefix) if rr.path else req.path
            netloc = (
                host if port is None or _DEFAULT_PORTS.get(scheme) == port else f"{host}:{port}"
            )
            loc = f"{scheme}://{netloc}{path}"
            if req.query:
                loc += "?" + req.query
            return Redirect(rr.status_code, loc)
    return fwd
