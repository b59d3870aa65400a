"""JWT (RFC 7519) verification for RequestAuthentication: RS256 and ES256 only.

Tokens come from whoever sends a request, so everything here treats them as hostile: a size
limit before any decoding, strict base64url, JSON parsed with a depth limit, an algorithm
allow-list checked against the *key's* type (a token cannot pick HS256 and turn a public key
into a shared secret, nor `none` and skip the signature), and every failure is one
`JwtError` with a short reason for the 401's body and the access log. Sans-IO: a token, keys
and a clock in, claims or an error out.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

__all__ = [
    "CLOCK_SKEW",
    "MAX_TOKEN_BYTES",
    "Jwks",
    "JwtError",
    "check_times",
    "parse_jwks",
    "peek_issuer",
    "verify",
]

MAX_TOKEN_BYTES = 8192  # Envoy's header limits make longer tokens unusable anyway
MAX_JWKS_BYTES = 1 << 20
MAX_JSON_DEPTH = 16  # claims nest a little (`realm_access.roles`); bombs nest a lot
CLOCK_SKEW = 60  # seconds, Envoy's jwt_authn default
_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")
_ALGS = {"RS256": "RSA", "ES256": "EC"}


class JwtError(ValueError):
    """Why a token (or a key set) was refused, in a phrase fit for a 401 body."""


PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True, slots=True)
class Jwks:
    """Keys by `kid` ("" for keys without one), each with its JWA family ("RSA"/"EC")."""

    keys: tuple[tuple[str, str, PublicKey], ...]

    def candidates(self, kid: str | None, family: str) -> list[PublicKey]:
        return [k for (i, f, k) in self.keys if f == family and (kid is None or i == kid)]


def _b64(part: str, what: str) -> bytes:
    if not _B64URL.match(part):
        raise JwtError(f"{what} is not base64url")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise JwtError(f"{what} is not base64url") from None


def _depth(v: Any, limit: int) -> int:
    """Nesting depth of decoded JSON, stopping once past `limit`."""
    stack = [(v, 1)]
    worst = 0
    while stack:
        x, d = stack.pop()
        worst = max(worst, d)
        if worst > limit:
            return worst
        if isinstance(x, dict):
            stack.extend((y, d + 1) for y in x.values())
        elif isinstance(x, list):
            stack.extend((y, d + 1) for y in x)
    return worst


def _json(data: bytes, what: str) -> dict[str, Any]:
    # A bracket count first: json.loads recurses per level, and a cheap scan refuses a bomb
    # before it costs a deep recursion.
    if data.count(b"[") + data.count(b"{") > 1024:
        raise JwtError(f"{what} has too many nested values")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        raise JwtError(f"{what} is not JSON") from None
    if not isinstance(obj, dict):
        raise JwtError(f"{what} is not a JSON object")
    if _depth(obj, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise JwtError(f"{what} nests deeper than {MAX_JSON_DEPTH}")
    return obj


def _int_from_b64(v: Any, what: str) -> int:
    if not isinstance(v, str):
        raise JwtError(f"JWKS: {what} must be a base64url string")
    return int.from_bytes(_b64(v, f"JWKS {what}"), "big")


def parse_jwks(text: str) -> Jwks:
    """A JWKS document (or a single JWK) → public keys. Keys of other types or curves are
    refused loudly: a key silently skipped would turn every token it signs into a 401
    nobody could explain."""
    if len(text) > MAX_JWKS_BYTES:
        raise JwtError("JWKS is larger than 1 MiB")
    doc = _json(text.encode(), "JWKS")
    raw = doc.get("keys", [doc] if "kty" in doc else None)
    if not isinstance(raw, list) or not raw:
        raise JwtError("JWKS has no keys")
    keys: list[tuple[str, str, PublicKey]] = []
    for i, k in enumerate(raw):
        if not isinstance(k, Mapping):
            raise JwtError(f"JWKS keys[{i}] is not an object")
        kid = k.get("kid", "")
        if not isinstance(kid, str):
            raise JwtError(f"JWKS keys[{i}].kid must be a string")
        kty = k.get("kty")
        try:
            if kty == "RSA":
                n = _int_from_b64(k.get("n"), f"keys[{i}].n")
                e = _int_from_b64(k.get("e"), f"keys[{i}].e")
                if n.bit_length() < 2048:
                    raise JwtError(f"JWKS keys[{i}] is an RSA key under 2048 bits")
                keys.append((kid, "RSA", rsa.RSAPublicNumbers(e, n).public_key()))
            elif kty == "EC":
                if k.get("crv") != "P-256":
                    raise JwtError(f"JWKS keys[{i}].crv must be P-256 (ES256)")
                x = _int_from_b64(k.get("x"), f"keys[{i}].x")
                y = _int_from_b64(k.get("y"), f"keys[{i}].y")
                pub = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
                keys.append((kid, "EC", pub))
            else:
                raise JwtError(f"JWKS keys[{i}].kty {kty!r} is not supported (RSA or EC)")
        except ValueError as exc:  # cryptography: not a point on the curve, bad exponent
            if isinstance(exc, JwtError):
                raise
            raise JwtError(f"JWKS keys[{i}] is not a valid public key") from None
    return Jwks(tuple(keys))


def _split(token: str) -> tuple[str, str, str]:
    if len(token) > MAX_TOKEN_BYTES:
        raise JwtError(f"token is longer than {MAX_TOKEN_BYTES} bytes")
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtError("token is not a signed JWT (want header.payload.signature)")
    return parts[0], parts[1], parts[2]


def peek_issuer(token: str) -> str | None:
    """The unverified `iss`, to pick which rule's keys verify the token; None if unreadable
    (verification then reports why)."""
    try:
        _, payload, _ = _split(token)
        iss = _json(_b64(payload, "payload"), "payload").get("iss")
    except JwtError:
        return None
    return iss if isinstance(iss, str) else None


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    v = claims.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise JwtError(f"claim {name} is not a number")
    return float(v)


def _audiences(claims: Mapping[str, Any]) -> tuple[str, ...]:
    aud = claims.get("aud")
    if aud is None:
        return ()
    if isinstance(aud, str):
        return (aud,)
    if isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        return tuple(aud)
    raise JwtError("claim aud is neither a string nor a list of strings")


def check_times(claims: Mapping[str, Any], now: float, skew: float = CLOCK_SKEW) -> None:
    """exp and nbf against `now`; separate so a cached verification is re-timed on reuse."""
    exp = _number(claims, "exp")
    if exp is not None and now > exp + skew:
        raise JwtError("token has expired")
    nbf = _number(claims, "nbf")
    if nbf is not None and now + skew < nbf:
        raise JwtError("token is not yet valid")


def verify(
    token: str,
    jwks: Jwks,
    *,
    issuer: str,
    audiences: tuple[str, ...] = (),
    now: float,
    skew: float = CLOCK_SKEW,
) -> dict[str, Any]:
    """The token's claims if its signature, issuer, audience and validity window hold."""
    h64, p64, s64 = _split(token)
    header = _json(_b64(h64, "header"), "header")
    alg = header.get("alg")
    family = _ALGS.get(alg) if isinstance(alg, str) else None
    if family is None:
        raise JwtError(f"algorithm {alg!r} is not accepted (RS256 or ES256)")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise JwtError("header kid is not a string")
    sig = _b64(s64, "signature")
    signed = f"{h64}.{p64}".encode()
    keys = jwks.candidates(kid, family)
    if not keys:
        raise JwtError("no key in the JWKS matches the token's kid and algorithm")
    ok = False
    for key in keys:
        try:
            if isinstance(key, rsa.RSAPublicKey):
                key.verify(sig, signed, padding.PKCS1v15(), hashes.SHA256())
            else:
                if len(sig) != 64:
                    raise InvalidSignature
                r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
                key.verify(encode_dss_signature(r, s), signed, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            continue
        ok = True
        break
    if not ok:
        raise JwtError("signature does not verify")
    claims = _json(_b64(p64, "payload"), "payload")
    if claims.get("iss") != issuer:
        raise JwtError("issuer does not match")
    check_times(claims, now, skew)
    if audiences and not set(audiences) & set(_audiences(claims)):
        raise JwtError("audience is not allowed")
    sub = claims.get("sub")
    if sub is not None and not isinstance(sub, str):
        raise JwtError("claim sub is not a string")
    return claims
