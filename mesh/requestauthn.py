"""RequestAuthentication at the waypoint: find a request's JWT, verify it, and say who sent it.

Istio's semantics: a request carrying a token that does not verify (bad signature, unknown
issuer, expired, wrong audience, keys unavailable) is refused with 401; a request carrying no
token passes unauthenticated, and only an AuthorizationPolicy (`requestPrincipals`) can then
refuse it. A verified token's principal is `iss/sub`. Unless `forwardOriginalToken` is set, the
token's header is removed before the request goes on (Envoy's `forward: false`), and
`outputPayloadToHeader` carries the verified payload (base64url) to the backend; a header of
that name sent by the client is always dropped, so a client cannot forge one.

Keys are resolved once per snapshot (`authenticator_for`): an inline JWKS, a `file://` path,
or `configmap://<ns>/<name>/<key>` in the snapshot. Keys that cannot be read make every token
of that issuer fail (as Envoy does with a JWKS it cannot fetch), never pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from mesh.authz import RequestAuth
from mesh.config.model import JwtRule, RequestAuthentication
from mesh.config.snapshot import Snapshot
from mesh.jwt import (
    MAX_JWKS_BYTES,
    Jwks,
    JwtError,
    check_times,
    parse_jwks,
    peek_issuer,
    verify,
)

__all__ = ["Authenticator", "AuthnResult", "authenticator_for"]

_DEFAULT_HEADER = "authorization"
_DEFAULT_PARAM = "access_token"
VERIFIED_CACHE = 1024  # tokens; a signature check costs ~0.5 ms, a dict hit nothing


@dataclass(frozen=True, slots=True)
class AuthnResult:
    """`error` set: answer 401. Otherwise `auth` (None: no token) and the headers to forward
    (`headers`, already without stripped tokens, with payload headers added)."""

    auth: RequestAuth | None
    error: str | None
    headers: tuple[tuple[str, str], ...]
    policy: str | None = None  # "ns/name" of the RequestAuthentication whose rule decided


@dataclass(frozen=True, slots=True)
class _Rule:
    rule: JwtRule
    policy: str
    jwks: Jwks | None
    jwks_error: str | None
    headers: tuple[tuple[str, str], ...]  # (lower-case name, prefix)
    params: tuple[str, ...]


def _load_jwks(rule: JwtRule, snap: Snapshot) -> tuple[Jwks | None, str | None]:
    try:
        if rule.jwks is not None:
            return parse_jwks(rule.jwks), None
        uri = rule.jwks_uri or ""
        if uri.startswith("file://"):
            path = uri[len("file://") :]
            with open(path, "rb") as f:
                data = f.read(MAX_JWKS_BYTES + 1)
            if len(data) > MAX_JWKS_BYTES:
                return None, f"JWKS file {path} is larger than 1 MiB"
            return parse_jwks(data.decode("utf-8")), None
        if uri.startswith("configmap://"):
            ns, name, key = uri[len("configmap://") :].split("/")
            cm = snap.config_map(ns, name)
            if cm is None or key not in cm.data:
                return None, f"JWKS ConfigMap {ns}/{name} has no key {key!r}"
            return parse_jwks(cm.data[key]), None
        return None, f"JWKS URI {uri!r} cannot be read"
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # JwtError is a ValueError
        return None, f"JWKS of {rule.issuer} unusable: {exc}"


class Authenticator:
    """Every JWT rule binding one waypoint service, keys resolved."""

    def __init__(self, authns: Sequence[RequestAuthentication], snap: Snapshot) -> None:
        rules: list[_Rule] = []
        for ra in authns:
            for r in ra.rules:
                jwks, err = _load_jwks(r, snap)
                if r.from_headers or r.from_params:
                    hs = tuple((h.name, h.prefix) for h in r.from_headers)
                    ps = r.from_params
                else:
                    hs, ps = ((_DEFAULT_HEADER, "Bearer "),), (_DEFAULT_PARAM,)
                rules.append(_Rule(r, ra.key, jwks, err, hs, ps))
        self.rules = tuple(rules)
        # Verified tokens (claims and rule), as Envoy's jwt_cache: clients resend one token on
        # every request. Times are re-checked on each hit; the cache goes with the snapshot.
        self._verified: dict[str, tuple[dict[str, Any], _Rule]] = {}
        self._names = frozenset(name for r in rules for name, _ in r.headers)
        self._params = any(r.params for r in rules)
        self._param_names = frozenset(p for r in rules for p in r.params)
        self.output_headers = frozenset(
            r.rule.output_payload_to_header for r in rules if r.rule.output_payload_to_header
        )

    def _found(
        self, headers: Sequence[tuple[str, str]], query: str
    ) -> list[tuple[str, str | None, list[_Rule]]]:
        """(token, header it came in or None for a parameter, rules reading that place)."""
        if not (self._params and query):
            for k, _ in headers:
                if k in self._names:
                    break
            else:
                return []  # the common case: no token anywhere, one pass over the names
        found: dict[tuple[str, str | None], list[_Rule]] = {}
        params: list[tuple[str, str]] | None = None
        for r in self.rules:
            for name, prefix in r.headers:
                for k, v in headers:
                    if k != name:
                        continue
                    if prefix:
                        if name == _DEFAULT_HEADER and prefix == "Bearer ":
                            ok = v[:7].lower() == "bearer "
                        else:
                            ok = v.startswith(prefix)
                        if not ok:
                            continue
                        v = v[len(prefix) :]
                    found.setdefault((v.strip(), name), []).append(r)
            if r.params and query:
                if params is None:
                    params = _params(query, self._param_names)
                for k, v in params:
                    if k in r.params:
                        found.setdefault((v, None), []).append(r)
        return [(tok, where, rs) for (tok, where), rs in found.items()]

    def authenticate(
        self, headers: Sequence[tuple[str, str]], query: str, now: float
    ) -> AuthnResult:
        found = self._found(headers, query)
        auth: RequestAuth | None = None
        policy: str | None = None
        strip: set[str] = set(self.output_headers)
        added: list[tuple[str, str]] = []
        for token, where, rules in found:
            if not token:
                return AuthnResult(None, "Jwt is empty", ())
            hit = self._verified.get(token)
            if hit is not None and hit[1] in rules:
                claims, rule = hit
                try:
                    check_times(claims, now)
                except JwtError as exc:
                    del self._verified[token]
                    return AuthnResult(None, f"Jwt verification fails: {exc}", (), rule.policy)
            else:
                checked = self._verify(token, rules, now)
                if isinstance(checked, AuthnResult):
                    return checked
                claims, rule = checked
            if auth is None:
                sub = claims.get("sub", "")
                auth = RequestAuth(f"{rule.rule.issuer}/{sub}", claims)
                policy = rule.policy
            if where is not None and not rule.rule.forward_original_token:
                strip.add(where)
            out = rule.rule.output_payload_to_header
            if out:
                added.append((out, token.split(".")[1]))
        kept = tuple((k, v) for k, v in headers if k not in strip)
        return AuthnResult(auth, None, kept + tuple(added), policy)

    def _verify(
        self, token: str, rules: list[_Rule], now: float
    ) -> tuple[dict[str, Any], _Rule] | AuthnResult:
        iss = peek_issuer(token)
        rule = next((r for r in rules if r.rule.issuer == iss), None)
        if rule is None:
            why = "Jwt issuer is not configured" if iss else "Jwt is not in the form of h.p.s"
            return AuthnResult(None, why, ())
        if rule.jwks is None:
            return AuthnResult(None, rule.jwks_error or "JWKS unavailable", (), rule.policy)
        try:
            r = rule.rule
            claims = verify(token, rule.jwks, issuer=r.issuer, audiences=r.audiences, now=now)
        except JwtError as exc:
            return AuthnResult(None, f"Jwt verification fails: {exc}", (), rule.policy)
        if len(self._verified) >= VERIFIED_CACHE:
            self._verified.clear()
        self._verified[token] = (claims, rule)
        return claims, rule


def _params(query: str, names: frozenset[str]) -> list[tuple[str, str]]:
    """The query parameters named `names`, decoded; the rest are skipped undecoded, so a
    query of many parameters costs one split, not a parse."""
    out = []
    for part in query.split("&"):
        k, _, v = part.partition("=")
        if k in names:
            out.append((k, unquote_plus(v)))
    return out


_cache_snap: list[Snapshot | None] = [None]
_CACHE: dict[tuple[int, ...], Authenticator] = {}


def authenticator_for(
    snap: Snapshot, authns: Sequence[RequestAuthentication]
) -> Authenticator | None:
    """The authenticator for these RequestAuthentications, built once per snapshot (keys are
    read then: a file or ConfigMap change arrives with the next snapshot). Only the current
    snapshot's are kept, so an old snapshot is never held alive here."""
    if not authns:
        return None
    if _cache_snap[0] is not snap:
        _CACHE.clear()
        _cache_snap[0] = snap
    key = tuple(id(a) for a in authns)
    a = _CACHE.get(key)
    if a is None:
        if len(_CACHE) > 256:
            _CACHE.clear()
        a = _CACHE[key] = Authenticator(authns, snap)
    return a
