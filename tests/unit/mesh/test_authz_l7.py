# ruff: noqa: E501  (the matching tables read best one case per line)
"""Complete AuthorizationPolicy at the waypoint: every `to`/`from` field and its `not` form,
Istio's wildcards, `when` conditions, AUDIT, dry run, and the fail-closed reading of L7 parts
at ztunnel. Policies are written as users write them and go through the real parser."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.authz import AuthzRequest, RequestAuth, authorize
from mesh.config.parse import ConfigErrors, parse_objects
from mesh.config.snapshot import PolicySet

TD = "spiffe://cluster.local"


def pset(*specs: tuple[str, dict[str, Any]], dry: tuple[int, ...] = ()) -> PolicySet:
    docs = []
    for i, (action, spec) in enumerate(specs):
        meta: dict[str, Any] = {"name": f"p{i}-{action.lower()}", "namespace": "shop"}
        if i in dry:
            meta["annotations"] = {"istio.io/dry-run": "true"}
        docs.append(
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "AuthorizationPolicy",
                "metadata": meta,
                "spec": {"action": action, **spec},
            }
        )
    pols = parse_objects(docs).authorization_policies
    by = {a: tuple(p for p in pols if p.action.value == a) for a in ("ALLOW", "DENY", "AUDIT")}
    return PolicySet(by["ALLOW"], by["DENY"], by["AUDIT"])


def rq(
    method: str = "GET",
    path: str = "/",
    host: str = "shop.example",
    *,
    sa: str | None = "web",
    ns: str = "shop",
    ip: str = "10.0.1.5",
    port: int = 8080,
    headers: tuple[tuple[str, str], ...] = (),
    auth: RequestAuth | None = None,
) -> AuthzRequest:
    principal = f"{TD}/ns/{ns}/sa/{sa}" if sa else None
    return AuthzRequest(principal, ns if sa else None, ip, port, method, path, host, headers, auth)


def allow_to(**op: list[str]) -> PolicySet:
    return pset(("ALLOW", {"rules": [{"to": [{"operation": op}]}]}))


def allow_from(**src: list[str]) -> PolicySet:
    return pset(("ALLOW", {"rules": [{"from": [{"source": src}]}]}))


def allow_when(
    key: str, values: list[str] | None = None, not_values: list[str] | None = None
) -> PolicySet:
    cond: dict[str, Any] = {"key": key}
    if values is not None:
        cond["values"] = values
    if not_values is not None:
        cond["notValues"] = not_values
    return pset(("ALLOW", {"rules": [{"when": [cond]}]}))


JWT = RequestAuth(
    "https://issuer.test/alice",
    {
        "iss": "https://issuer.test",
        "sub": "alice",
        "aud": ["shop", "billing"],
        "azp": "web-ui",
        "groups": ["dev", "ops"],
        "realm": {"role": "admin", "level": 3},
        "verified": True,
    },
)

OPERATIONS: list[tuple[str, PolicySet, AuthzRequest, bool]] = [
    ("method exact", allow_to(methods=["GET"]), rq("GET"), True),
    ("method other", allow_to(methods=["GET"]), rq("POST"), False),
    ("notMethods", allow_to(notMethods=["DELETE"]), rq("DELETE"), False),
    ("notMethods other", allow_to(notMethods=["DELETE"]), rq("GET"), True),
    ("path exact", allow_to(paths=["/api"]), rq(path="/api"), True),
    ("path exact is not prefix", allow_to(paths=["/api"]), rq(path="/api/x"), False),
    ("path prefix", allow_to(paths=["/api/*"]), rq(path="/api/v1/x"), True),
    ("path prefix needs its slash", allow_to(paths=["/api/*"]), rq(path="/apix"), False),
    ("path suffix", allow_to(paths=["*.html"]), rq(path="/a/b.html"), True),
    ("path suffix other", allow_to(paths=["*.html"]), rq(path="/a/b.htm"), False),
    ("path presence", allow_to(paths=["*"]), rq(path="/anything"), True),
    ("path ignores query", allow_to(paths=["/q"]), rq(path="/q?x=1"), True),
    ("notPaths", allow_to(notPaths=["/admin/*"]), rq(path="/admin/users"), False),
    ("notPaths other", allow_to(notPaths=["/admin/*"]), rq(path="/shop"), True),
    ("host exact", allow_to(hosts=["shop.example"]), rq(host="shop.example"), True),
    ("host case-insensitive", allow_to(hosts=["Shop.Example"]), rq(host="SHOP.example"), True),
    (
        "host exact excludes port",
        allow_to(hosts=["shop.example"]),
        rq(host="shop.example:8080"),
        False,
    ),
    ("host with any port", allow_to(hosts=["shop.example:*"]), rq(host="shop.example:8080"), True),
    ("host presence", allow_to(hosts=["*"]), rq(host="x"), True),
    ("host suffix", allow_to(hosts=["*.example"]), rq(host="api.example"), True),
    ("host prefix", allow_to(hosts=["shop.*"]), rq(host="shop.test"), True),
    ("host other", allow_to(hosts=["*.example"]), rq(host="example.org"), False),
    ("notHosts", allow_to(notHosts=["*.internal"]), rq(host="db.internal"), False),
    ("notHosts other", allow_to(notHosts=["*.internal"]), rq(host="shop.example"), True),
    ("port", allow_to(ports=["8080"]), rq(port=8080), True),
    ("port other", allow_to(ports=["8080"]), rq(port=9090), False),
    ("notPorts", allow_to(notPorts=["8080"]), rq(port=8080), False),
    (
        "all fields of one operation AND",
        allow_to(methods=["GET"], paths=["/a"]),
        rq("GET", "/b"),
        False,
    ),
]

SOURCES: list[tuple[str, PolicySet, AuthzRequest, bool]] = [
    ("principal", allow_from(principals=["cluster.local/ns/shop/sa/web"]), rq(), True),
    ("principal prefix", allow_from(principals=["cluster.local/ns/shop/*"]), rq(sa="x"), True),
    ("principal presence", allow_from(principals=["*"]), rq(sa=None), False),
    ("notPrincipals", allow_from(notPrincipals=["*/sa/web"]), rq(), False),
    ("notPrincipals plaintext", allow_from(notPrincipals=["*/sa/web"]), rq(sa=None), True),
    ("namespace", allow_from(namespaces=["shop"]), rq(), True),
    ("namespace other", allow_from(namespaces=["shop"]), rq(ns="evil"), False),
    ("notNamespaces", allow_from(notNamespaces=["evil"]), rq(ns="evil"), False),
    ("ipBlocks", allow_from(ipBlocks=["10.0.0.0/16"]), rq(ip="10.0.9.9"), True),
    ("ipBlocks other", allow_from(ipBlocks=["10.0.0.0/16"]), rq(ip="10.1.0.1"), False),
    ("notIpBlocks", allow_from(notIpBlocks=["10.0.1.5"]), rq(ip="10.0.1.5"), False),
    (
        "requestPrincipals",
        allow_from(requestPrincipals=["https://issuer.test/*"]),
        rq(auth=JWT),
        True,
    ),
    ("requestPrincipals no token", allow_from(requestPrincipals=["*"]), rq(), False),
    ("requestPrincipals any token", allow_from(requestPrincipals=["*"]), rq(auth=JWT), True),
    ("notRequestPrincipals", allow_from(notRequestPrincipals=["*/alice"]), rq(auth=JWT), False),
    ("notRequestPrincipals no token", allow_from(notRequestPrincipals=["*/alice"]), rq(), True),
]

CONDITIONS: list[tuple[str, PolicySet, AuthzRequest, bool]] = [
    ("header", allow_when("request.headers[X-Env]", ["prod"]), rq(headers=(("x-env", "prod"),)), True),
    ("header other", allow_when("request.headers[x-env]", ["prod"]), rq(headers=(("x-env", "dev"),)), False),
    ("header absent", allow_when("request.headers[x-env]", ["*"]), rq(), False),
    ("header present empty", allow_when("request.headers[x-env]", ["*"]), rq(headers=(("x-env", ""),)), True),
    ("header prefix", allow_when("request.headers[x-env]", ["pr*"]), rq(headers=(("x-env", "prod"),)), True),
    ("header repeated joins", allow_when("request.headers[x-a]", ["1,2"]), rq(headers=(("x-a", "1"), ("x-a", "2"))), True),
    ("header notValues absent", allow_when("request.headers[x-env]", not_values=["dev"]), rq(), True),
    ("header notValues", allow_when("request.headers[x-env]", not_values=["dev"]), rq(headers=(("x-env", "dev"),)), False),
    ("source.ip", allow_when("source.ip", ["10.0.0.0/8"]), rq(ip="10.2.3.4"), True),
    ("source.ip other", allow_when("source.ip", ["10.0.0.0/8"]), rq(ip="192.168.0.1"), False),
    ("source.namespace", allow_when("source.namespace", ["shop"]), rq(), True),
    ("source.principal", allow_when("source.principal", ["*/sa/web"]), rq(), True),
    ("source.principal notValues", allow_when("source.principal", not_values=["*/sa/web"]), rq(), False),
    ("destination.port", allow_when("destination.port", ["8080"]), rq(port=8080), True),
    ("destination.port other", allow_when("destination.port", ["8080"]), rq(port=80), False),
    ("auth.principal", allow_when("request.auth.principal", ["https://issuer.test/alice"]), rq(auth=JWT), True),
    ("auth.principal no token", allow_when("request.auth.principal", ["*"]), rq(), False),
    ("auth.audiences", allow_when("request.auth.audiences", ["billing"]), rq(auth=JWT), True),
    ("auth.audiences other", allow_when("request.auth.audiences", ["hr"]), rq(auth=JWT), False),
    ("auth.presenter", allow_when("request.auth.presenter", ["web-*"]), rq(auth=JWT), True),
    ("claims list", allow_when("request.auth.claims[groups]", ["ops"]), rq(auth=JWT), True),
    ("claims list other", allow_when("request.auth.claims[groups]", ["hr"]), rq(auth=JWT), False),
    ("claims nested", allow_when("request.auth.claims[realm][role]", ["admin"]), rq(auth=JWT), True),
    ("claims nested number", allow_when("request.auth.claims[realm][level]", ["3"]), rq(auth=JWT), True),
    ("claims bool", allow_when("request.auth.claims[verified]", ["true"]), rq(auth=JWT), True),
    ("claims missing", allow_when("request.auth.claims[nope][x]", ["*"]), rq(auth=JWT), False),
    ("claims notValues", allow_when("request.auth.claims[groups]", not_values=["ops"]), rq(auth=JWT), False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "pols", "request_", "allowed"),
    OPERATIONS + SOURCES + CONDITIONS,
    ids=[c[0] for c in OPERATIONS + SOURCES + CONDITIONS],
)
def test_matching(name: str, pols: PolicySet, request_: AuthzRequest, allowed: bool) -> None:
    assert authorize(pols, request_, l7=True).allowed is allowed, name


def test_deny_beats_allow_and_names_the_policy() -> None:
    pols = pset(
        ("ALLOW", {"rules": [{}]}),
        ("DENY", {"rules": [{"to": [{"operation": {"paths": ["/admin/*"]}}]}]}),
    )
    d = authorize(pols, rq(path="/admin/x"), l7=True)
    assert not d.allowed and d.policy == "shop/p1-deny"
    assert authorize(pols, rq(path="/shop"), l7=True).allowed


def test_audit_marks_without_deciding() -> None:
    pols = pset(
        ("AUDIT", {"rules": [{"to": [{"operation": {"methods": ["DELETE"]}}]}]}),
        ("DENY", {"rules": [{"to": [{"operation": {"paths": ["/x"]}}]}]}),
    )
    d = authorize(pols, rq("DELETE", "/y"), l7=True)
    assert d.allowed and d.audited and d.audit_policy == "shop/p0-audit"
    d = authorize(pols, rq("DELETE", "/x"), l7=True)
    assert not d.allowed and d.audited  # audited and denied: one does not hide the other
    assert not authorize(pols, rq("GET", "/y"), l7=True).audited
    # An AUDIT policy alone is not an ALLOW policy: it does not make the workload deny-by-default.
    alone = pset(("AUDIT", {"rules": [{}]}))
    assert authorize(alone, rq(), l7=True).allowed


def test_dry_run_deny_is_reported_not_enforced() -> None:
    pols = pset(("DENY", {"rules": [{"to": [{"operation": {"methods": ["POST"]}}]}]}), dry=(0,))
    d = authorize(pols, rq("POST"), l7=True)
    assert d.allowed and d.shadow == "shadow_denied" and d.shadow_policy == "shop/p0-deny"
    d = authorize(pols, rq("GET"), l7=True)
    assert d.allowed and d.shadow == "shadow_allowed" and d.shadow_policy is None


def test_dry_run_allow_does_not_make_deny_by_default() -> None:
    pols = pset(("ALLOW", {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}), dry=(0,))
    d = authorize(pols, rq("POST"), l7=True)
    assert d.allowed and d.shadow == "shadow_denied"
    d = authorize(pols, rq("GET"), l7=True)
    assert d.allowed and d.shadow == "shadow_allowed" and d.shadow_policy == "shop/p0-allow"


def test_dry_run_beside_enforced_policies() -> None:
    pols = pset(
        ("ALLOW", {"rules": [{"to": [{"operation": {"paths": ["/a"]}}]}]}),
        ("DENY", {"rules": [{"to": [{"operation": {"paths": ["/a"]}}]}]}),
        dry=(1,),
    )
    d = authorize(pols, rq(path="/a"), l7=True)
    assert d.allowed and d.policy == "shop/p0-allow" and d.shadow == "shadow_denied"
    assert not authorize(pols, rq(path="/b"), l7=True).allowed


L7_RULES = [
    {"to": [{"operation": {"methods": ["GET"]}}]},
    {"from": [{"source": {"requestPrincipals": ["*"]}}]},
    {"when": [{"key": "request.headers[x-a]", "values": ["1"]}]},
]


@pytest.mark.parametrize("rule", L7_RULES, ids=["operation", "requestPrincipals", "when"])
def test_l7_parts_at_ztunnel_fail_closed(rule: dict[str, Any]) -> None:
    """Istio: at ztunnel an ALLOW rule with L7 parts matches nothing; a DENY rule is judged on
    its L4 parts alone, so it denies more, never less."""
    allow = pset(("ALLOW", {"rules": [rule]}))
    conn = AuthzRequest(f"{TD}/ns/shop/sa/web", "shop", "10.0.1.5", 8080)
    assert not authorize(allow, conn, l7=False).allowed
    deny = pset(("DENY", {"rules": [rule]}))
    assert not authorize(deny, conn, l7=False).allowed


def test_allow_rule_with_any_l7_part_is_omitted_whole_at_ztunnel() -> None:
    """istiod drops the whole rule, even when another `to` of it is L4-only."""
    pols = pset(
        (
            "ALLOW",
            {
                "rules": [
                    {"to": [{"operation": {"ports": ["8080"]}}, {"operation": {"paths": ["/a"]}}]}
                ]
            },
        )
    )
    conn = AuthzRequest(f"{TD}/ns/shop/sa/web", "shop", "10.0.1.5", 8080)
    assert not authorize(pols, conn, l7=False).allowed
    assert authorize(pols, rq(path="/b", port=8080), l7=True).allowed  # the waypoint reads both


def test_deny_rule_keeps_its_l4_parts_at_ztunnel() -> None:
    pols = pset(
        ("DENY", {"rules": [{"to": [{"operation": {"ports": ["9090"], "paths": ["/a"]}}]}]})
    )
    assert not authorize(pols, AuthzRequest(None, None, "10.0.1.5", 9090), l7=False).allowed
    assert authorize(pols, AuthzRequest(None, None, "10.0.1.5", 8080), l7=False).allowed


def test_l4_when_keys_work_at_ztunnel() -> None:
    pols = allow_when("source.namespace", ["shop"])
    conn = AuthzRequest(f"{TD}/ns/shop/sa/web", "shop", "10.0.1.5", 8080)
    assert authorize(pols, conn, l7=False).allowed
    other = AuthzRequest(f"{TD}/ns/x/sa/web", "x", "10.0.1.5", 8080)
    assert not authorize(pols, other, l7=False).allowed


def errors(spec: dict[str, Any], annotations: dict[str, str] | None = None) -> list[str]:
    meta: dict[str, Any] = {"name": "p", "namespace": "shop"}
    if annotations:
        meta["annotations"] = annotations
    doc = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": meta,
        "spec": spec,
    }
    with pytest.raises(ConfigErrors) as ei:
        parse_objects([doc])
    return [str(e) for e in ei.value.errors]


P = "AuthorizationPolicy shop/p: "
PARSE_ERRORS: list[tuple[dict[str, Any], str]] = [
    ({"action": "CUSTOM", "provider": {"name": "x"}}, P + "spec.action CUSTOM is not supported"),
    ({"action": "LOG"}, P + "spec.action 'LOG' must be ALLOW, DENY or AUDIT"),
    ({"rulez": []}, P + "spec.rulez is not a known field"),
    ({"rules": [{"from": [{"source": {"principalz": ["a"]}}]}]}, P + "spec.rules[0].from[0].source.principalz is not a known field"),
    ({"rules": [{"to": [{"operation": {"path": ["/a"]}}]}]}, P + "spec.rules[0].to[0].operation.path is not a known field"),
    ({"rules": [{"to": [{"operation": {"paths": ["/a/*/b"]}}]}]}, P + "spec.rules[0].to[0].operation.paths[0] '/a/*/b': '*' is allowed only as a prefix or a suffix"),
    ({"rules": [{"to": [{"operation": {"hosts": ["*.a*"]}}]}]}, P + "spec.rules[0].to[0].operation.hosts[0] '*.a*': '*' is allowed"),
    ({"rules": [{"to": [{"operation": {"paths": ["api"]}}]}]}, P + "spec.rules[0].to[0].operation.paths[0] 'api' must start with '/'"),
    ({"rules": [{"to": [{"operation": {"notPaths": ["/a/{*}/b"]}}]}]}, P + "spec.rules[0].to[0].operation.notPaths[0] '/a/{*}/b': path templates ({*}, {**}) are not supported"),
    ({"rules": [{"from": [{"source": {"notIpBlocks": ["10.0.0.300"]}}]}]}, P + "spec.rules[0].from[0].source.notIpBlocks[0] '10.0.0.300' is not an IP"),
    ({"rules": [{"from": [{"source": {"remoteIpBlocks": ["1.2.3.4"]}}]}]}, P + "spec.rules[0].from[0].source.remoteIpBlocks is not supported"),
    ({"rules": [{"when": [{"key": "request.header[x]", "values": ["1"]}]}]}, P + "spec.rules[0].when[0].key 'request.header[x]' is not a known attribute"),
    ({"rules": [{"when": [{"key": "request.headers", "values": ["1"]}]}]}, P + "spec.rules[0].when[0].key 'request.headers': write request.headers[<header-name>]"),
    ({"rules": [{"when": [{"key": "request.auth.claims[a]x", "values": ["1"]}]}]}, P + "spec.rules[0].when[0].key 'request.auth.claims[a]x': brackets"),
    ({"rules": [{"when": [{"key": "source.ip[x]", "values": ["1.2.3.4"]}]}]}, P + "spec.rules[0].when[0].key 'source.ip[x]': source.ip takes no [name]"),
    ({"rules": [{"when": [{"key": "source.ip", "values": ["nope"]}]}]}, P + "spec.rules[0].when[0].values[0] 'nope' is not an IP"),
    ({"rules": [{"when": [{"key": "destination.port", "values": ["http"]}]}]}, P + "spec.rules[0].when[0].values[0] 'http' is not a port"),
    ({"rules": [{"when": [{"key": "source.namespace"}]}]}, P + "spec.rules[0].when[0] must set values or notValues"),
    ({"rules": [{"when": [{"key": "connection.sni", "values": ["a"]}]}]}, P + "spec.rules[0].when[0].key 'connection.sni' is not supported"),
    ({"rules": [{"when": [{"key": "source.namespace", "values": ["a"], "notvalues": ["b"]}]}]}, P + "spec.rules[0].when[0].notvalues is not a known field"),
]  # fmt: skip


@pytest.mark.parametrize(("spec", "message"), PARSE_ERRORS, ids=[m for _, m in PARSE_ERRORS])
def test_parse_errors_name_object_and_field(spec: dict[str, Any], message: str) -> None:
    assert any(e.startswith(message) for e in errors(spec)), errors(spec)


def test_bad_dry_run_annotation() -> None:
    msgs = errors({}, {"istio.io/dry-run": "yes"})
    assert msgs == [P + 'metadata.annotations.istio.io/dry-run must be "true" or "false"']


def test_valid_policy_parses_every_field() -> None:
    doc = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {
            "name": "p",
            "namespace": "shop",
            "annotations": {"istio.io/dry-run": "true"},
        },
        "spec": {
            "action": "AUDIT",
            "targetRefs": [{"kind": "Service", "group": "", "name": "web"}],
            "rules": [
                {
                    "from": [{"source": {"requestPrincipals": ["iss/*"], "notNamespaces": ["x"]}}],
                    "to": [{"operation": {"notHosts": ["*.x"], "notPorts": ["81"]}}],
                    "when": [{"key": "request.auth.claims[a][b]", "notValues": ["c"]}],
                }
            ],
        },
    }
    (pol,) = parse_objects([doc]).authorization_policies
    assert pol.dry_run and pol.action.value == "AUDIT"
    (rule,) = pol.rules
    assert rule.conditions[0].path == ("a", "b") and rule.has_l7
    assert rule.sources[0].request_principals == ("iss/*",)
