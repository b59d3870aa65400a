"""Istio AuthorizationPolicy evaluation, shared by ztunnel (L4) and the waypoint (L7).

Sans-IO and pure: a request description in, a decision out. Both proxies call this one
evaluator so the two enforcement points can never disagree about what a policy means.

Semantics (Istio's): DENY policies are evaluated first and any match denies; then, if any ALLOW
policy applies to the workload, the request must match one of them; with no policies at all
the request is allowed. An ALLOW policy without rules allows nothing; a rule `{}` matches
everything. Inside a rule, `from` entries are ORed, `to` entries are ORed, and the two are
ANDed; inside one entry every set field must match.

L7 attributes at ztunnel (`l7=False`). Istio's "Use Layer 4 security policy" page says
ztunnel cannot enforce methods/paths/hosts and must fail closed in both directions. We
follow it: in an ALLOW policy an operation that names L7 attributes never matches (so it
allows nothing); in a DENY policy the L7 attributes are dropped and the operation matches on its
L4 fields alone (so it denies more than the author asked, never less).

Costly work (glob parsing, CIDR objects, frozensets) is done once per policy object by
`compile_policy`, cached by object identity; a snapshot swap brings new policy objects, so a
stale compiled form is never used.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mesh.config.model import (
    AuthorizationPolicy,
    PolicyOperation,
    PolicyRule,
    PolicySource,
    Service,
    Waypoint,
)
from mesh.config.snapshot import PolicySet, Snapshot

__all__ = [
    "AuthzDecision",
    "AuthzRequest",
    "CompiledPolicy",
    "authorize",
    "compile_policy",
    "waypoint_policies",
]

_SPIFFE = "spiffe://"


@dataclass(frozen=True, slots=True)
class AuthzRequest:
    """What the enforcement point knows about a connection or request.

    `source_principal` is the peer's full SPIFFE ID (``spiffe://td/ns/x/sa/y``) or None for
    plaintext; `source_namespace` is derived from it by the caller when known."""

    source_principal: str | None
    source_namespace: str | None
    source_ip: str
    dest_port: int
    method: str | None = None
    path: str | None = None
    host: str | None = None


@dataclass(frozen=True, slots=True)
class AuthzDecision:
    allowed: bool
    policy: str | None  # "ns/name" of the deciding policy, None when no policy decided
    reason: str


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
        return any(g(value) for g in self.globs)


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

    def matches(self, principal: str | None, req: AuthzRequest) -> bool:
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
        if self.hosts is not None and not self.hosts(req.host):
            return False
        return not (self.not_hosts is not None and self.not_hosts(req.host))


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

    def matches(self, principal: str | None, req: AuthzRequest, *, l7: bool, deny: bool) -> bool:
        if self.sources and not any(s.matches(principal, req) for s in self.sources):
            return False
        return not self.operations or any(o.matches(req, l7=l7, deny=deny) for o in self.operations)


def _compile_rule(r: PolicyRule) -> _Rule:
    return _Rule(
        tuple(_compile_source(s) for s in r.sources),
        tuple(_compile_op(o) for o in r.operations),
    )


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """A policy with every matcher built; `matches` is the per-connection cost."""

    key: str
    deny: bool
    rules: tuple[_Rule, ...]

    def matches(self, principal: str | None, req: AuthzRequest, *, l7: bool) -> bool:
        return any(r.matches(principal, req, l7=l7, deny=self.deny) for r in self.rules)


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


def authorize(policies: PolicySet, req: AuthzRequest, *, l7: bool) -> AuthzDecision:
    """Decide one connection (`l7=False`, ztunnel) or one request (`l7=True`, waypoint)."""
    if not policies.allow and not policies.deny:
        return AuthzDecision(True, None, "no policies")
    principal = _principal(req.source_principal)
    for pol in policies.deny:
        if compile_policy(pol).matches(principal, req, l7=l7):
            return AuthzDecision(False, pol.key, "denied by DENY policy")
    if not policies.allow:
        return AuthzDecision(True, None, "no DENY policy matched")
    for pol in policies.allow:
        if compile_policy(pol).matches(principal, req, l7=l7):
            return AuthzDecision(True, pol.key, "allowed by ALLOW policy")
    return AuthzDecision(False, None, "no ALLOW policy matched")


def waypoint_policies(snap: Snapshot, waypoint: Waypoint, service: Service | None) -> PolicySet:
    """Policies the waypoint enforces for traffic to `service`: those whose targetRefs name
    the waypoint Gateway or the Service (in their own namespace), and root-namespace ones that
    target the `waypoint` GatewayClass (mesh-wide waypoint policy)."""
    allow: list[AuthorizationPolicy] = []
    deny: list[AuthorizationPolicy] = []
    for pol in snap.authorization_policies:
        if not pol.target_refs:
            continue
        applies = False
        for ref in pol.target_refs:
            if ref.kind == "Gateway":
                applies = pol.namespace == waypoint.namespace and ref.name == waypoint.name
            elif ref.kind == "Service":
                applies = (
                    service is not None
                    and pol.namespace == service.namespace
                    and ref.name == service.name
                )
            elif ref.kind == "GatewayClass":
                applies = pol.namespace == snap.root_namespace and ref.name == "waypoint"
            if applies:
                break
        if applies:
            (deny if pol.action.value == "DENY" else allow).append(pol)
    return PolicySet(tuple(allow), tuple(deny))
