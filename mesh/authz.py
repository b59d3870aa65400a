"""Istio AuthorizationPolicy evaluation, shared by ztunnel (L4) and the waypoint (L7).

Sans-IO and pure: a request description in, a decision out. Both proxies call this one
evaluator so the two enforcement points can never disagree about what a policy means.

Semantics (Istio's): DENY policies are evaluated first and any match denies; then, if any ALLOW
policy applies to the workload, the request must match one of them; with no policies at all
the request is allowed. An ALLOW policy without rules allows nothing; a rule `{}` matches
everything. Inside a rule, `from` entries are ORed, `to` entries are ORed, and the two are
ANDed; inside one entry every set field must match.

AUDIT policies never change a decision: a match marks the request audited (access log and a
metric). A policy annotated `istio.io/dry-run: "true"` is evaluated beside the enforced ones,
as Envoy's shadow rules, and only its would-be result is reported (`shadow_allowed` /
`shadow_denied` with the policy's name). CUSTOM is refused when parsing.

L7 attributes at ztunnel (`l7=False`). Istio's "Use Layer 4 security policy" page says
ztunnel cannot enforce methods/paths/hosts (nor request principals or `when` keys about the
request) and must fail closed in both directions. We follow istiod's translation for
ztunnel: in an ALLOW policy a rule naming any L7 attribute (in any `from`, `to` or `when`) is
omitted, so it allows nothing; in a DENY policy the L7 attributes are dropped and the rule
matches on its L4 fields alone (so it denies more than the author asked, never less).

Matching (Istio's): strings are exact, `prefix*`, `*suffix`, or `*` (any non-empty value;
for a header in `when`, present at all); hosts compare case-insensitively against the Host
header as sent, port included; paths are matched without their query string; a `not` form
holds when the attribute is absent. A header's repeated values are joined with "," as Envoy
does; a claim that is a list matches when any element does.

Costly work (glob parsing, CIDR objects, frozensets) is done once per policy object by
`compile_policy`, cached by object identity; a snapshot swap brings new policy objects, so a
stale compiled form is never used.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mesh.config.model import (
    AuthorizationPolicy,
    PolicyCondition,
    PolicyOperation,
    PolicyRule,
    PolicySource,
    PolicyTargetRef,
    RequestAuthentication,
    Service,
    Waypoint,
)
from mesh.config.snapshot import PolicySet, Snapshot

__all__ = [
    "AuthzDecision",
    "AuthzRequest",
    "CompiledPolicy",
    "RequestAuth",
    "applies_at_waypoint",
    "authorize",
    "compile_policy",
    "waypoint_policies",
    "waypoint_request_authns",
]

_SPIFFE = "spiffe://"


def _no_claims() -> Mapping[str, Any]:
    return {}


@dataclass(frozen=True, slots=True)
class RequestAuth:
    """A verified JWT: `principal` is Istio's request principal, `iss/sub`."""

    principal: str
    claims: Mapping[str, Any] = field(default_factory=_no_claims)

    @property
    def audiences(self) -> tuple[str, ...]:
        aud = self.claims.get("aud")
        if isinstance(aud, str):
            return (aud,)
        if isinstance(aud, list):
            return tuple(a for a in aud if isinstance(a, str))
        return ()

    @property
    def presenter(self) -> str | None:
        azp = self.claims.get("azp")
        return azp if isinstance(azp, str) else None


@dataclass(frozen=True, slots=True)
class AuthzRequest:
    """What the enforcement point knows about a connection or request.

    `source_principal` is the peer's full SPIFFE ID (``spiffe://td/ns/x/sa/y``) or None for
    plaintext; `source_namespace` is derived from it by the caller when known. `headers` are
    the request's, names in lower case; `auth` the verified JWT, if any."""

    source_principal: str | None
    source_namespace: str | None
    source_ip: str
    dest_port: int
    method: str | None = None
    path: str | None = None
    host: str | None = None
    headers: Sequence[tuple[str, str]] = ()
    auth: RequestAuth | None = None


@dataclass(frozen=True, slots=True)
class AuthzDecision:
    allowed: bool
    policy: str | None  # "ns/name" of the deciding policy, None when no policy decided
    reason: str
    audit_policy: str | None = None  # the AUDIT policy that matched: the request is audited
    shadow: str | None = None  # dry run: "shadow_allowed" or "shadow_denied"
    shadow_policy: str | None = None  # the dry-run policy behind `shadow`, if one matched

    @property
    def audited(self) -> bool:
        return self.audit_policy is not None


Matcher = Callable[[str], bool]


def _glob(pattern: str, *, fold: bool = False) -> Matcher:
    """Istio's string match: exact, "*" (anything non-empty), "*suffix", "prefix*"."""
    if fold:
        pattern = pattern.lower()
    if pattern == "*":
        return lambda s: bool(s)
    if pattern.startswith("*"):
        suffix = pattern[1:]
        return lambda s: s.endswith(suffix)
    if pattern.endswith("*"):
        prefix = pattern[:-1]
        return lambda s: s.startswith(prefix)
    return lambda s: s == pattern


class _AnyOf:
    """A set of globs: exact values in a frozenset (one hash lookup), the rest as matchers."""

    __slots__ = ("exact", "fold", "globs")

    def __init__(self, patterns: Sequence[str], *, fold: bool = False) -> None:
        self.fold = fold
        exact = [p for p in patterns if "*" not in p]
        self.exact = frozenset(p.lower() for p in exact) if fold else frozenset(exact)
        self.globs = tuple(_glob(p, fold=fold) for p in patterns if "*" in p)

    def __call__(self, value: str | None) -> bool:
        if value is None:
            return False
        if self.fold:
            value = value.lower()
        if value in self.exact:
            return True
        for g in self.globs:  # noqa: SIM110 (per-request path: no generator frame)
            if g(value):
                return True
        return False


def _principal(full: str | None) -> str | None:
    """Istio principals drop the scheme: spiffe://td/ns/x/sa/y → td/ns/x/sa/y."""
    if full is None:
        return None
    return full[len(_SPIFFE) :] if full.startswith(_SPIFFE) else full


class _Cidrs:
    __slots__ = ("nets",)

    def __init__(self, cidrs: Sequence[str]) -> None:
        self.nets = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)

    def __call__(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in n for n in self.nets)


@dataclass(frozen=True, slots=True)
class _Source:
    principals: _AnyOf | None
    not_principals: _AnyOf | None
    namespaces: _AnyOf | None
    not_namespaces: _AnyOf | None
    ip_blocks: _Cidrs | None
    not_ip_blocks: _Cidrs | None
    request_principals: _AnyOf | None
    not_request_principals: _AnyOf | None

    def matches(self, principal: str | None, req: AuthzRequest, *, l7: bool, deny: bool) -> bool:
        if self.request_principals is not None or self.not_request_principals is not None:
            if not l7:
                if not deny:
                    return False  # an ALLOW source ztunnel cannot check never matches
            else:
                rp = req.auth.principal if req.auth is not None else None
                if self.request_principals is not None and not self.request_principals(rp):
                    return False
                if self.not_request_principals is not None and self.not_request_principals(rp):
                    return False
        if self.principals is not None and not self.principals(principal):
            return False
        if self.not_principals is not None and self.not_principals(principal):
            return False
        if self.namespaces is not None and not self.namespaces(req.source_namespace):
            return False
        if self.not_namespaces is not None and self.not_namespaces(req.source_namespace):
            return False
        if self.ip_blocks is not None and not self.ip_blocks(req.source_ip):
            return False
        return not (self.not_ip_blocks is not None and self.not_ip_blocks(req.source_ip))


@dataclass(frozen=True, slots=True)
class _Operation:
    ports: frozenset[int] | None
    not_ports: frozenset[int]
    has_l7: bool
    methods: _AnyOf | None
    not_methods: _AnyOf | None
    paths: _AnyOf | None
    not_paths: _AnyOf | None
    hosts: _AnyOf | None
    not_hosts: _AnyOf | None

    def matches(self, req: AuthzRequest, *, l7: bool, deny: bool) -> bool:
        if self.ports is not None and req.dest_port not in self.ports:
            return False
        if req.dest_port in self.not_ports:
            return False
        if not self.has_l7:
            return True
        if not l7:
            # Fail closed at L4: an ALLOW operation we cannot check never matches; a DENY
            # operation is judged on its L4 fields alone (see module docstring).
            return deny
        if self.methods is not None and not self.methods(req.method):
            return False
        if self.not_methods is not None and self.not_methods(req.method):
            return False
        path = req.path.split("?", 1)[0] if req.path is not None else None
        if self.paths is not None and not self.paths(path):
            return False
        if self.not_paths is not None and self.not_paths(path):
            return False
        if self.hosts is not None and not _host_match(self.hosts, req.host):
            return False
        return not (self.not_hosts is not None and _host_match(self.not_hosts, req.host))


def _host_match(m: _AnyOf, host: str | None) -> bool:
    """Istio matches `hosts` against the Host header as sent, port included and case
    ignored: `example.com` does not match `example.com:8080`; write `example.com:*` too."""
    return host is not None and m(host)


_Extract = Callable[[AuthzRequest, "str | None"], Sequence[str]]


def _claim_values(claims: Mapping[str, Any], path: tuple[str, ...]) -> tuple[str, ...]:
    v: Any = claims
    for name in path:
        if not isinstance(v, Mapping):
            return ()
        v = v.get(name)
    if isinstance(v, str):
        return (v,)
    if isinstance(v, bool):
        return ("true" if v else "false",)
    if isinstance(v, int | float):
        return (str(v),)
    if isinstance(v, list):
        return tuple(x for x in v if isinstance(x, str))
    return ()


def _extractor(c: PolicyCondition) -> _Extract:
    attr = c.attribute
    if attr == "request.headers":
        name = c.path[0]

        def header(req: AuthzRequest, _p: str | None) -> Sequence[str]:
            vals = [v for k, v in req.headers if k == name]
            return (",".join(vals),) if vals else ()

        return header
    if attr == "source.ip":
        return lambda req, _p: (req.source_ip,)
    if attr == "source.namespace":
        return lambda req, _p: (req.source_namespace,) if req.source_namespace else ()
    if attr == "source.principal":
        return lambda _req, p: (p,) if p else ()
    if attr == "destination.port":
        return lambda req, _p: (str(req.dest_port),)
    if attr == "request.auth.principal":
        return lambda req, _p: (req.auth.principal,) if req.auth is not None else ()
    if attr == "request.auth.audiences":
        return lambda req, _p: req.auth.audiences if req.auth is not None else ()
    if attr == "request.auth.presenter":
        return lambda req, _p: (
            (req.auth.presenter,) if req.auth is not None and req.auth.presenter else ()
        )
    if attr == "request.auth.claims":
        path = c.path
        return lambda req, _p: _claim_values(req.auth.claims, path) if req.auth else ()
    raise ValueError(f"unknown condition key {c.key!r}")  # the parser refuses these


def _values(c: PolicyCondition, values: Sequence[str]) -> Matcher | None:
    if not values:
        return None
    if c.attribute == "source.ip":
        return _Cidrs(values)
    if c.attribute == "destination.port":
        ports = frozenset(values)
        return ports.__contains__
    any_of = _AnyOf(values)
    if c.attribute == "request.headers" and "*" in values:
        return lambda _v: True  # Istio: "*" on a header is a presence match, empty or not
    return lambda v: any_of(v)


@dataclass(frozen=True, slots=True)
class _Condition:
    l7: bool
    extract: _Extract
    values: Matcher | None
    not_values: Matcher | None

    def holds(self, principal: str | None, req: AuthzRequest, *, l7: bool, deny: bool) -> bool:
        if self.l7 and not l7:
            return deny  # fail closed at ztunnel, as for operations
        got = self.extract(req, principal)
        if self.values is not None:
            for v in got:
                if self.values(v):
                    break
            else:
                return False
        if self.not_values is not None:
            for v in got:
                if self.not_values(v):
                    return False
        return True


def _compile_condition(c: PolicyCondition) -> _Condition:
    return _Condition(c.has_l7, _extractor(c), _values(c, c.values), _values(c, c.not_values))


def _opt(values: Sequence[str], *, fold: bool = False) -> _AnyOf | None:
    return _AnyOf(values, fold=fold) if values else None


def _compile_source(s: PolicySource) -> _Source:
    return _Source(
        _opt(s.principals),
        _opt(s.not_principals),
        _opt(s.namespaces),
        _opt(s.not_namespaces),
        _Cidrs(s.ip_blocks) if s.ip_blocks else None,
        _Cidrs(s.not_ip_blocks) if s.not_ip_blocks else None,
        _opt(s.request_principals),
        _opt(s.not_request_principals),
    )


def _compile_op(o: PolicyOperation) -> _Operation:
    return _Operation(
        frozenset(o.ports) if o.ports else None,
        frozenset(o.not_ports),
        o.has_l7,
        _opt(o.methods),
        _opt(o.not_methods),
        _opt(o.paths),
        _opt(o.not_paths),
        _opt(o.hosts, fold=True),
        _opt(o.not_hosts, fold=True),
    )


@dataclass(frozen=True, slots=True)
class _Rule:
    sources: tuple[_Source, ...]
    operations: tuple[_Operation, ...]
    conditions: tuple[_Condition, ...]
    has_l7: bool

    def matches(self, principal: str | None, req: AuthzRequest, *, l7: bool, deny: bool) -> bool:
        if not l7 and not deny and self.has_l7:
            return False  # istiod drops an ALLOW rule naming HTTP attributes for ztunnel
        # Plain loops: this is the per-request path, and generator expressions cost a frame each.
        if self.sources:
            for s in self.sources:
                if s.matches(principal, req, l7=l7, deny=deny):
                    break
            else:
                return False
        if self.operations:
            for o in self.operations:
                if o.matches(req, l7=l7, deny=deny):
                    break
            else:
                return False
        for c in self.conditions:  # noqa: SIM110
            if not c.holds(principal, req, l7=l7, deny=deny):
                return False
        return True


def _compile_rule(r: PolicyRule) -> _Rule:
    return _Rule(
        tuple(_compile_source(s) for s in r.sources),
        tuple(_compile_op(o) for o in r.operations),
        tuple(_compile_condition(c) for c in r.conditions),
        r.has_l7,
    )


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """A policy with every matcher built; `matches` is the per-connection cost."""

    key: str
    deny: bool
    rules: tuple[_Rule, ...]

    def matches(self, principal: str | None, req: AuthzRequest, *, l7: bool) -> bool:
        deny = self.deny
        for r in self.rules:  # noqa: SIM110
            if r.matches(principal, req, l7=l7, deny=deny):
                return True
        return False


_CACHE: dict[int, tuple[AuthorizationPolicy, CompiledPolicy]] = {}
_CACHE_MAX = 8192


def compile_policy(pol: AuthorizationPolicy) -> CompiledPolicy:
    """The compiled form of `pol`, built once per policy object.

    Keyed by `id()` with the object itself kept alongside, so an id reused after garbage
    collection can never return another policy's matchers."""
    hit = _CACHE.get(id(pol))
    if hit is not None and hit[0] is pol:
        return hit[1]
    compiled = CompiledPolicy(
        pol.key, pol.action.value == "DENY", tuple(_compile_rule(r) for r in pol.rules)
    )
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.clear()  # snapshots replaced wholesale; dropping everything is cheap and safe
    _CACHE[id(pol)] = (pol, compiled)
    return compiled


_NO_POLICIES = AuthzDecision(True, None, "no policies")


@dataclass(frozen=True, slots=True)
class _CompiledSet:
    """A PolicySet split once into enforced and dry-run parts, every policy compiled."""

    deny: tuple[CompiledPolicy, ...]
    allow: tuple[CompiledPolicy, ...]
    audit: tuple[CompiledPolicy, ...]
    dry_deny: tuple[CompiledPolicy, ...]
    dry_allow: tuple[CompiledPolicy, ...]


_SETS: dict[tuple[int, ...], tuple[PolicySet, _CompiledSet]] = {}


def _compiled_set(policies: PolicySet) -> _CompiledSet:
    """Keyed by the identities of the policies in the set: ztunnel builds a new PolicySet per
    connection, over the same policy objects. The entry keeps the set (so its policies) alive,
    so an id in a key cannot be reused by another object while the entry exists."""
    key = (*map(id, policies.allow), 0, *map(id, policies.deny), 0, *map(id, policies.audit))
    hit = _SETS.get(key)
    if hit is not None:
        return hit[1]

    def comp(pols: tuple[AuthorizationPolicy, ...], dry: bool) -> tuple[CompiledPolicy, ...]:
        return tuple(compile_policy(p) for p in pols if p.dry_run is dry)

    cs = _CompiledSet(
        comp(policies.deny, False),
        comp(policies.allow, False),
        comp(policies.audit, False),
        comp(policies.deny, True),
        comp(policies.allow, True),
    )
    if len(_SETS) >= _CACHE_MAX:
        _SETS.clear()
    _SETS[key] = (policies, cs)
    return cs


def authorize(policies: PolicySet, req: AuthzRequest, *, l7: bool) -> AuthzDecision:
    """Decide one connection (`l7=False`, ztunnel) or one request (`l7=True`, waypoint):
    DENY first, then ALLOW (CUSTOM, which Istio puts first, is refused at parse time)."""
    if not policies.allow and not policies.deny and not policies.audit:
        return _NO_POLICIES
    cs = _compiled_set(policies)
    principal = _principal(req.source_principal)
    decision: AuthzDecision | None = None
    for cp in cs.deny:
        if cp.matches(principal, req, l7=l7):
            decision = AuthzDecision(False, cp.key, "denied by DENY policy")
            break
    if decision is None:
        for cp in cs.allow:
            if cp.matches(principal, req, l7=l7):
                decision = AuthzDecision(True, cp.key, "allowed by ALLOW policy")
                break
        else:
            decision = (
                AuthzDecision(False, None, "no ALLOW policy matched")
                if cs.allow
                else AuthzDecision(True, None, "no DENY policy matched")
            )
    audit = None
    for cp in cs.audit:
        if cp.matches(principal, req, l7=l7):
            audit = cp.key
            break
    if audit is None and not cs.dry_deny and not cs.dry_allow:
        return decision
    shadow: str | None = None
    shadow_policy: str | None = None
    if cs.dry_deny or cs.dry_allow:
        shadow, shadow_policy = _shadow(cs, principal, req, l7=l7)
    return AuthzDecision(
        decision.allowed, decision.policy, decision.reason, audit, shadow, shadow_policy
    )


def _shadow(
    cs: _CompiledSet, principal: str | None, req: AuthzRequest, *, l7: bool
) -> tuple[str, str | None]:
    """The dry-run policies' own verdict, as Envoy's shadow engines give it: dry-run DENY
    policies first (a match is `shadow_denied`), then dry-run ALLOW ones (a match is
    `shadow_allowed`, none matching `shadow_denied`)."""
    for cp in cs.dry_deny:
        if cp.matches(principal, req, l7=l7):
            return "shadow_denied", cp.key
    if not cs.dry_allow:
        return "shadow_allowed", None
    for cp in cs.dry_allow:
        if cp.matches(principal, req, l7=l7):
            return "shadow_allowed", cp.key
    return "shadow_denied", None


def waypoint_policies(snap: Snapshot, waypoint: Waypoint, service: Service | None) -> PolicySet:
    """Policies the waypoint enforces for traffic to `service`: those whose targetRefs name
    the waypoint Gateway or the Service (in their own namespace), and root-namespace ones that
    target the `waypoint` GatewayClass (mesh-wide waypoint policy)."""
    by_action: dict[str, list[AuthorizationPolicy]] = {"ALLOW": [], "DENY": [], "AUDIT": []}
    for pol in snap.authorization_policies:
        if applies_at_waypoint(snap, pol.namespace, pol.target_refs, waypoint, service):
            by_action[pol.action.value].append(pol)
    return PolicySet(tuple(by_action["ALLOW"]), tuple(by_action["DENY"]), tuple(by_action["AUDIT"]))


def applies_at_waypoint(
    snap: Snapshot,
    namespace: str,
    target_refs: Sequence[PolicyTargetRef],
    waypoint: Waypoint,
    service: Service | None,
) -> bool:
    """Whether an object bound by `target_refs` (an AuthorizationPolicy, a
    RequestAuthentication) applies at `waypoint` for traffic to `service`."""
    if not target_refs:
        return False
    for ref in target_refs:
        if ref.kind == "Gateway":
            hit = namespace == waypoint.namespace and ref.name == waypoint.name
        elif ref.kind == "Service":
            hit = service is not None and (namespace, ref.name) == (service.namespace, service.name)
        else:  # GatewayClass: mesh-wide, from the root namespace only
            hit = namespace == snap.root_namespace and ref.name == "waypoint"
        if hit:
            return True
    return False


def waypoint_request_authns(
    snap: Snapshot, waypoint: Waypoint, service: Service | None
) -> tuple[RequestAuthentication, ...]:
    """RequestAuthentications bound (by targetRefs) to this waypoint or service."""
    return tuple(
        ra
        for ra in snap.request_authentications
        if applies_at_waypoint(snap, ra.namespace, ra.target_refs, waypoint, service)
    )
