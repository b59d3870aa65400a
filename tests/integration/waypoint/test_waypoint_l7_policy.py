"""L7 policy at a real waypoint: JWT (401 / unauthenticated / requestPrincipals 403), `when`
conditions, AUDIT and dry run in the access log, and CiliumNetworkPolicy HTTP rules (403
naming the CNP). Requests go client → ztunnel → HBONE → waypoint → HBONE → ztunnel → pod."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tests.integration.waypoint.waypointkit import NS, Mesh

Doc = dict[str, Any]
ISS = "https://issuer.test"
KEY = ec.generate_private_key(ec.SECP256R1())
OTHER = ec.generate_private_key(ec.SECP256R1())
SVC_REF = [{"kind": "Service", "group": "", "name": "echo"}]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwks() -> str:
    n = KEY.public_key().public_numbers()
    k = {"kty": "EC", "crv": "P-256", "kid": "k1"}
    k |= {"x": b64(n.x.to_bytes(32, "big")), "y": b64(n.y.to_bytes(32, "big"))}
    return json.dumps({"keys": [k]})


def token(sub: str = "alice", key: Any = KEY, **claims: Any) -> str:
    head = b64(json.dumps({"alg": "ES256", "kid": "k1"}).encode())
    body = {"iss": ISS, "sub": sub, "exp": time.time() + 600, **claims}
    signing = f"{head}.{b64(json.dumps(body).encode())}"
    r, s = decode_dss_signature(key.sign(signing.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def authn(**rule: Any) -> Doc:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": {"name": "jwt", "namespace": NS},
        "spec": {"targetRefs": SVC_REF, "jwtRules": [{"issuer": ISS, "jwks": jwks(), **rule}]},
    }


def policy(name: str, action: str, rules: list[Doc], dry_run: bool = False) -> Doc:
    meta: Doc = {"name": name, "namespace": NS}
    if dry_run:
        meta["annotations"] = {"istio.io/dry-run": "true"}
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": meta,
        "spec": {"targetRefs": SVC_REF, "action": action, "rules": rules},
    }


def bearer(tok: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {tok}")]


async def access_lines(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> list[Doc]:
    for _ in range(100):
        if not mesh.waypoint.handler.in_flight:
            break
        await asyncio.sleep(0.01)
    lines = [json.loads(r.message) for r in caplog.records if r.name == "mesh.access"]
    return [d for d in lines if d["reporter"] == "waypoint"]


async def test_jwt_401_unauthenticated_and_request_principals(mesh: Mesh) -> None:
    mesh.apply(
        [
            authn(outputPayloadToHeader="x-jwt-payload"),
            policy(
                "need-jwt",
                "ALLOW",
                [{"from": [{"source": {"requestPrincipals": [f"{ISS}/*"]}}]}],
            ),
        ]
    )
    good = token()
    r = await mesh.get("/who", headers=bearer(good))
    assert r.status == 200, r.body
    seen = {k.lower(): v for k, v in r.json()["headers"].items()}
    assert "authorization" not in seen  # forwardOriginalToken defaults to false
    assert seen["x-jwt-payload"] == good.split(".")[1]
    r = await mesh.get("/who", headers=bearer(token(key=OTHER)))
    assert r.status == 401 and b"signature does not verify" in r.body
    assert (r.header("www-authenticate") or "").startswith("Bearer")
    r = await mesh.get("/who", headers=bearer("not.a.jwt"))
    assert r.status == 401
    r = await mesh.get("/who", headers=bearer(token(exp=time.time() - 3600)))
    assert r.status == 401 and b"expired" in r.body
    # No token: authentication lets it through, the ALLOW policy's requestPrincipals refuse.
    r = await mesh.get("/who")
    assert r.status == 403 and b"RBAC: access denied" in r.body


async def test_jwt_without_policy_lets_tokenless_requests_through(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mesh.access")
    mesh.apply([authn()])
    assert (await mesh.get("/x")).status == 200
    assert (await mesh.get("/y", headers=bearer(token(key=OTHER)))).status == 401
    by_path = {d["path"]: d for d in await access_lines(mesh, caplog)}
    assert by_path["/x"]["verdict"] == "allow"
    assert by_path["/y"]["verdict"] == "deny" and by_path["/y"]["policy"] == f"{NS}/jwt"


async def test_claims_and_header_conditions(mesh: Mesh) -> None:
    mesh.apply(
        [
            authn(),
            policy(
                "admins-prod",
                "ALLOW",
                [
                    {
                        "to": [{"operation": {"methods": ["GET"], "paths": ["/admin/*"]}}],
                        "when": [
                            {"key": "request.auth.claims[realm][roles]", "values": ["admin"]},
                            {"key": "request.headers[x-env]", "values": ["prod"]},
                        ],
                    },
                    {"to": [{"operation": {"notPaths": ["/admin/*"]}}]},
                ],
            ),
        ]
    )
    admin = token(realm={"roles": ["dev", "admin"]})
    user = token(realm={"roles": ["dev"]})
    env = [("x-env", "prod")]
    assert (await mesh.get("/admin/a", headers=bearer(admin) + env)).status == 200
    assert (await mesh.get("/admin/a", headers=bearer(user) + env)).status == 403
    assert (await mesh.get("/admin/a", headers=bearer(admin))).status == 403
    assert (await mesh.get("/shop", headers=bearer(user))).status == 200


async def test_audit_and_dry_run_are_logged_not_enforced(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mesh.access")
    mesh.apply(
        [
            policy("audit-deletes", "AUDIT", [{"to": [{"operation": {"methods": ["DELETE"]}}]}]),
            policy(
                "would-deny",
                "DENY",
                [{"to": [{"operation": {"paths": ["/secret"]}}]}],
                dry_run=True,
            ),
        ]
    )
    assert (await mesh.get("/thing", method="DELETE")).status == 200
    assert (await mesh.get("/secret")).status == 200  # dry run: not enforced
    assert (await mesh.get("/open")).status == 200
    lines = await access_lines(mesh, caplog)
    by_path = {d["path"]: d for d in lines}
    assert by_path["/thing"]["audited"] is True
    assert by_path["/thing"]["audit_policy"] == f"{NS}/audit-deletes"
    assert by_path["/secret"]["shadow_result"] == "shadow_denied"
    assert by_path["/secret"]["shadow_policy"] == f"{NS}/would-deny"
    assert by_path["/open"]["shadow_result"] == "shadow_allowed"
    assert "audited" not in by_path["/secret"]
    wp = mesh.waypoint.metrics.exposition().decode()
    assert f'ambientmesh_waypoint_audited_requests_total{{policy="{NS}/audit-deletes"}} 1.0' in wp
    shadow = f'ambientmesh_waypoint_dry_run_requests_total{{policy="{NS}/would-deny",'
    assert shadow + 'result="shadow_denied"} 1.0' in wp


async def test_cilium_http_rules_at_the_waypoint(mesh: Mesh) -> None:
    cnp = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "public-get", "namespace": NS},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "echo"}},
            "ingress": [
                {
                    "fromEndpoints": [{"matchLabels": {"app": "client"}}],
                    "toPorts": [
                        {
                            "ports": [{"port": str(mesh.echo_port), "protocol": "TCP"}],
                            "rules": {"http": [{"method": "GET", "path": "/public/.*"}]},
                        }
                    ],
                }
            ],
        },
    }
    mesh.apply([cnp])
    assert (await mesh.get("/public/a")).status == 200
    r = await mesh.get("/public/a", method="POST", body=b"x")
    assert r.status == 403 and b"Access denied" in r.body and b"public-get" in r.body
    r = await mesh.get("/publicx")  # Cilium's path is anchored: the whole path must match
    assert r.status == 403
    r = await mesh.get("/private/public/a")
    assert r.status == 403
