"""JWT verification and RequestAuthentication, with keys made here and tokens signed here,
including the hostile ones a client can send: alg=none, HS256 keyed with the public key, a
wrong key, expired, oversized, bad base64, JSON bombs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from mesh.config.parse import ConfigErrors, parse_objects
from mesh.jwt import MAX_TOKEN_BYTES, JwtError, parse_jwks, verify
from mesh.requestauthn import Authenticator

ISS = "https://issuer.test"
NOW = 1_800_000_000.0


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64int(n: int) -> str:
    return b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def jwk(key: Any, kid: str) -> dict[str, str]:
    pub = key.public_key().public_numbers()
    if isinstance(key, rsa.RSAPrivateKey):
        return {"kty": "RSA", "kid": kid, "n": b64int(pub.n), "e": b64int(pub.e)}
    return {
        "kty": "EC",
        "kid": kid,
        "crv": "P-256",
        "x": b64(pub.x.to_bytes(32, "big")),
        "y": b64(pub.y.to_bytes(32, "big")),
    }


JWKS = json.dumps({"keys": [jwk(RSA_KEY, "r1"), jwk(EC_KEY, "e1")]})


def sign(
    claims: dict[str, Any],
    key: Any = RSA_KEY,
    *,
    alg: str | None = None,
    kid: str | None = None,
    header: dict[str, Any] | None = None,
    raw: str | None = None,
) -> str:
    if alg is None:
        alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
    h = header if header is not None else {"alg": alg, "typ": "JWT"}
    if kid is not None:
        h["kid"] = kid
    body = raw if raw is not None else json.dumps(claims)
    signing = f"{b64(json.dumps(h).encode())}.{b64(body.encode())}".encode()
    if alg == "RS256":
        sig = key.sign(signing, padding.PKCS1v15(), hashes.SHA256())
    elif alg == "ES256":
        r, s = decode_dss_signature(key.sign(signing, ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    elif alg == "HS256":
        sig = hmac.new(key, signing, hashlib.sha256).digest()
    else:
        sig = b""
    return f"{signing.decode()}.{b64(sig)}"


def good(**extra: Any) -> dict[str, Any]:
    return {"iss": ISS, "sub": "alice", "aud": "shop", "exp": NOW + 600, **extra}


def check(token: str, **kw: Any) -> dict[str, Any]:
    return verify(token, parse_jwks(JWKS), issuer=ISS, now=NOW, **kw)


def test_rs256_and_es256_verify() -> None:
    assert check(sign(good(), RSA_KEY, kid="r1"))["sub"] == "alice"
    assert check(sign(good(), EC_KEY, kid="e1"))["sub"] == "alice"
    assert check(sign(good(), RSA_KEY))["sub"] == "alice"  # no kid: every RSA key is tried


PUBLIC_PEM = RSA_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)

HOSTILE: list[tuple[str, str, str]] = [
    ("alg none", sign(good(), alg="none"), "algorithm 'none' is not accepted"),
    ("alg NONE", sign(good(), header={"alg": "NONE"}, alg="none"), "is not accepted"),
    ("HS256 keyed with the public key", sign(good(), PUBLIC_PEM, alg="HS256"), "is not accepted"),
    ("wrong RSA key", sign(good(), RSA_OTHER, kid="r1"), "signature does not verify"),
    ("unknown kid", sign(good(), RSA_KEY, kid="zz"), "no key in the JWKS matches"),
    ("RS256 header over an EC key's kid", sign(good(), RSA_KEY, kid="e1"), "no key"),
    ("expired", sign(good(exp=NOW - 61)), "token has expired"),
    ("not yet valid", sign(good(nbf=NOW + 120)), "token is not yet valid"),
    ("exp not a number", sign(good(exp="tomorrow")), "claim exp is not a number"),
    ("other issuer", sign(good(iss="https://evil.test")), "issuer does not match"),
    ("huge token", sign(good(pad="x" * MAX_TOKEN_BYTES)), "token is longer than"),
    ("two parts", "abc.def", "token is not a signed JWT"),
    ("bad base64", "a$b.c.d", "header is not base64url"),
    ("header not JSON", f"{b64(b'{nope')}.{b64(b'{}')}.{b64(b'x')}", "header is not JSON"),
    ("header a list", f"{b64(b'[1]')}.{b64(b'{}')}.{b64(b'x')}", "not a JSON object"),
    ("nested JSON bomb", sign({}, raw="[" * 1500 + "]" * 1500), "too many nested"),
    ("nested claims", sign(good(bomb=json.loads("[" * 500 + "]" * 500))), "nests deeper"),
    ("deep claims", sign(good(deep=json.loads('{"a":' * 20 + "1" + "}" * 20))), "nests deeper"),
    ("short ES256 signature", sign(good(), EC_KEY, kid="e1")[:-10], "does not verify"),
    ("sub not a string", sign(good(sub=5)), "claim sub is not a string"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "token", "why"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_tokens_are_refused(name: str, token: str, why: str) -> None:
    with pytest.raises(JwtError, match=why):
        check(token)


def test_clock_skew_and_audiences() -> None:
    assert check(sign(good(exp=NOW - 30)))  # within the 60 s skew
    assert check(sign(good(nbf=NOW + 30)))
    assert check(sign(good(aud=["a", "shop"])), audiences=("shop",))
    with pytest.raises(JwtError, match="audience"):
        check(sign(good(aud="other")), audiences=("shop",))
    with pytest.raises(JwtError, match="audience"):
        check(sign({"iss": ISS, "sub": "a"}), audiences=("shop",))


@pytest.mark.parametrize(
    ("jwks", "why"),
    [
        ("{", "JWKS is not JSON"),
        ('{"keys": []}', "JWKS has no keys"),
        ('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "kty 'oct' is not supported"),
        ('{"keys": [{"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"}]}', "P-256"),
        ('{"keys": [{"kty": "EC", "crv": "P-256", "x": "AQ", "y": "AQ"}]}', "not a valid"),
        ('{"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]}', "under 2048 bits"),
    ],
)
def test_bad_jwks_refused(jwks: str, why: str) -> None:
    with pytest.raises(JwtError, match=why):
        parse_jwks(jwks)


# -- RequestAuthentication ---------------------------------------------------------------------


def ra(rules: list[dict[str, Any]], extra: list[dict[str, Any]] | None = None) -> Authenticator:
    doc = {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": {"name": "jwt", "namespace": "shop"},
        "spec": {"targetRefs": [{"kind": "Service", "name": "web"}], "jwtRules": rules},
    }
    snap = parse_objects([doc, *(extra or [])])
    return Authenticator(snap.request_authentications, snap)


def test_default_locations_principal_and_stripping() -> None:
    a = ra([{"issuer": ISS, "jwks": JWKS}])
    tok = sign(good())
    res = a.authenticate([("authorization", f"Bearer {tok}"), ("x-a", "1")], "", NOW)
    assert res.error is None and res.auth is not None
    assert res.auth.principal == f"{ISS}/alice" and res.policy == "shop/jwt"
    assert res.headers == (("x-a", "1"),)  # forwardOriginalToken false: the token stays here
    res = a.authenticate([], f"access_token={tok}&x=1", NOW)
    assert res.auth is not None and res.auth.principal == f"{ISS}/alice"
    # No token at all: passes unauthenticated (an ALLOW with requestPrincipals decides).
    res = a.authenticate([("authorization", "Basic dXNlcjpwdw==")], "", NOW)
    assert res.error is None and res.auth is None


def test_invalid_or_foreign_token_is_an_error() -> None:
    a = ra([{"issuer": ISS, "jwks": JWKS}])
    bad = a.authenticate([("authorization", f"Bearer {sign(good(), RSA_OTHER)}")], "", NOW)
    assert bad.error == "Jwt verification fails: signature does not verify"
    foreign = sign(good(iss="https://other.test"))
    res = a.authenticate([("authorization", f"Bearer {foreign}")], "", NOW)
    assert res.error == "Jwt issuer is not configured"
    res = a.authenticate([("authorization", "Bearer garbage")], "", NOW)
    assert res.error is not None


def test_from_headers_params_forward_and_payload_header() -> None:
    a = ra(
        [
            {
                "issuer": ISS,
                "jwks": JWKS,
                "fromHeaders": [{"name": "X-Jwt", "prefix": "Token "}],
                "fromParams": ["t"],
                "forwardOriginalToken": True,
                "outputPayloadToHeader": "X-Jwt-Payload",
            }
        ]
    )
    tok = sign(good())
    spoof = ("x-jwt-payload", "forged")
    res = a.authenticate([("x-jwt", f"Token {tok}"), spoof], "", NOW)
    assert res.auth is not None
    assert ("x-jwt", f"Token {tok}") in res.headers  # forwarded as asked
    assert ("x-jwt-payload", tok.split(".")[1]) in res.headers and spoof not in res.headers
    # The default Authorization header is not a location when fromHeaders is given.
    res = a.authenticate([("authorization", f"Bearer {tok}"), spoof], "", NOW)
    assert res.auth is None and spoof not in res.headers  # a forged payload never passes
    assert a.authenticate([], f"t={tok}", NOW).auth is not None


def test_jwks_from_file_and_configmap(tmp_path: Path) -> None:
    f = tmp_path / "jwks.json"
    f.write_text(JWKS)
    tok = sign(good(), EC_KEY, kid="e1")
    hdr = [("authorization", f"Bearer {tok}")]
    a = ra([{"issuer": ISS, "jwksUri": f"file://{f}"}])
    assert a.authenticate(hdr, "", NOW).auth is not None
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "keys", "namespace": "shop"},
        "data": {"jwks.json": JWKS},
    }
    a = ra([{"issuer": ISS, "jwksUri": "configmap://shop/keys/jwks.json"}], [cm])
    assert a.authenticate(hdr, "", NOW).auth is not None
    # Keys that cannot be read fail every token of that issuer; they never let one pass.
    a = ra([{"issuer": ISS, "jwksUri": "configmap://shop/missing/jwks.json"}])
    assert "has no key" in (a.authenticate(hdr, "", NOW).error or "")
    a = ra([{"issuer": ISS, "jwksUri": f"file://{tmp_path}/nope.json"}])
    assert "unusable" in (a.authenticate(hdr, "", NOW).error or "")


def test_parse_errors() -> None:
    doc = {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": {"name": "jwt", "namespace": "shop"},
        "spec": {
            "jwtRules": [
                {"issuer": ISS},
                {"issuer": "b", "jwks": "{}", "fromCookies": ["c"]},
                {"issuer": "c", "jwksUri": "https://keys.example/jwks"},
                {"jwks": JWKS},
                {"issuer": "d", "jwks": JWKS, "fromHeader": []},
            ]
        },
    }
    with pytest.raises(ConfigErrors) as ei:
        parse_objects([doc])
    msgs = [str(e) for e in ei.value.errors]
    p = "RequestAuthentication shop/jwt: spec.jwtRules"
    assert msgs == [
        f"{p}[0] must set exactly one of jwks and jwksUri (no OIDC discovery here)",
        f"{p}[1].fromCookies is not supported by this mesh",
        f"{p}[1].jwks JWKS has no keys",
        f"{p}[2].jwksUri 'https://keys.example/jwks': only file:///path and "
        "configmap://<namespace>/<name>/<key> are read (the mesh never fetches keys over the "
        "network)",
        f"{p}[3].issuer is required",
        f"{p}[4].fromHeader is not a known field",
    ]


def test_unreferenced_configmaps_stay_ignored() -> None:
    ignored: list[str] = []
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "a"}}
    snap = parse_objects([cm], ignored=ignored)
    assert snap.config_maps == () and ignored == ["ConfigMap a/x (v1)"]


def test_verification_cost_figure() -> None:
    """Not a timing assertion: figures for the report when run with -s."""
    hdrs = [[("authorization", f"Bearer {sign(good(n=i), EC_KEY, kid='e1')}")] for i in range(50)]
    a = ra([{"issuer": ISS, "jwks": JWKS}])
    t0 = time.perf_counter()
    for h in hdrs:
        assert a.authenticate(h, "", NOW).auth is not None
    t1 = time.perf_counter()
    for h in hdrs:
        assert a.authenticate(h, "", NOW).auth is not None
    t2 = time.perf_counter()
    print(f"ES256 first use {(t1 - t0) / 50 * 1e6:.0f} us, cached {(t2 - t1) / 50 * 1e6:.0f} us")


def test_cached_verification_is_retimed() -> None:
    a = ra([{"issuer": ISS, "jwks": JWKS}])
    hdr = [("authorization", f"Bearer {sign(good())}")]
    assert a.authenticate(hdr, "", NOW).auth is not None
    assert a.authenticate(hdr, "", NOW + 1).auth is not None  # from the cache
    late = a.authenticate(hdr, "", NOW + 600 + 61)
    assert late.error == "Jwt verification fails: token has expired"


def test_many_query_parameters_are_not_an_error() -> None:
    a = ra([{"issuer": ISS, "jwks": JWKS}])
    query = "&".join(f"p{i}=v" for i in range(500))
    res = a.authenticate([], query, NOW)
    assert res.error is None and res.auth is None
    res = a.authenticate([], f"{query}&access_token={sign(good())}", NOW)
    assert res.auth is not None
