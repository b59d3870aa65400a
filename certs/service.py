"""The CA service: nodes' ztunnels obtain workload SVIDs over TLS.

Two ways for a node to prove who it is, one per deployment:

* `SnapshotAuthorizer` (single hosts, the lab): mutual TLS with the node certificate
  (`spiffe://<td>/node/<name>` from `meshctl ca issue-node`); the config snapshot says which
  pods run on which node.
* `TokenReviewAuthorizer` (Kubernetes, certs/kube_auth.py): a ztunnel has no certificate before
  its first SVID, so it connects with server-only TLS (it verifies the CA against the trust
  bundle and the CA's identity) and sends its projected service-account token as
  `Authorization: Bearer`; the API server reviews the token and says which pods run on the
  token's node, as Istio's CA does.

Either way a node may get identities only of pods placed on that node, plus its own node
identity for renewal: a compromised node cannot mint other nodes' identities (DESIGN.md §2).
The CA's own serving identity is never issued to anyone, so no caller can pose as the CA to
harvest other nodes' tokens. Everything refused is logged with who asked, for what, and why.

Wire format, small on purpose: HTTP/1.1 `POST /v1/sign` with JSON
`{"csr": "<PEM>", "ttl_seconds": 86400}` → 200 `{"chain": ["<PEM>", ...], "bundle": "<PEM>"}`,
or 4xx `{"error": "..."}`. Keys never leave the node: only the CSR travels.

`python -m certs.service` (also `meshctl ca serve`) runs it as a process: readiness and
liveness on `/healthz/ready`, SIGTERM stops accepting and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certs.ca import MAX_TTL, CertificateAuthority, CertificateError
from certs.spiffe import SpiffeId, node_id
from certs.svid import Svid
from mesh.config.snapshot import Snapshot
from mesh.tls import PeerIdentityError, check_peer, client_context, server_context

log = logging.getLogger("certs.service")
MAX_BODY = 64 * 1024
READ_TIMEOUT = 10.0
CA_NODE_NAME = "ca"  # the CA serves as spiffe://<td>/node/ca, which it never issues
DEFAULT_PORT = 15012

__all__ = [
    "CaClient",
    "CaError",
    "CaService",
    "SnapshotAuthorizer",
    "TokenAuthorizer",
    "build_parser",
    "ca_identity",
    "main",
]


def ca_identity(trust_domain: str) -> str:
    """The identity the CA serves with; clients insist on it before sending anything."""
    return node_id(trust_domain, CA_NODE_NAME)


class SnapshotAuthorizer:
    """A node may have the identities of the pods the config schedules on it."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def allowed(self, node: str) -> frozenset[str]:
        snap = self.snapshot()
        ids = {snap.identity(p) for p in snap.pods_on_node(node)}
        ids.add(node_id(snap.trust_domain, node))
        return frozenset(ids)


class TokenAuthorizer(Protocol):
    """Bearer-token authorization (certs.kube_auth.TokenReviewAuthorizer): returns the caller
    or raises an exception whose message is the reason for the refusal."""

    async def authorize(self, token: str, identity: str) -> object: ...


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def csr_identity(csr_pem: bytes) -> str:
    """The one URI SAN of a CSR (the full checks happen when the CA signs it)."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        raise _Refused(400, "csr: not a PEM CSR with a subjectAltName") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise _Refused(400, f"csr: exactly one URI SAN needed, got {len(uris)}")
    return str(uris[0])


class CaService:
    """One TLS listener answering POST /v1/sign; `authorizer` decides who gets what."""

    def __init__(
        self,
        ca: CertificateAuthority,
        authorizer: SnapshotAuthorizer | TokenAuthorizer,
        *,
        auth_errors: tuple[type[Exception], ...] = (),
    ) -> None:
        self.ca = ca
        self.authorizer = authorizer
        self.auth_errors = auth_errors
        self.identity = ca_identity(ca.trust_domain)
        self.server_svid = ca.issue(self.identity, timedelta(days=30))
        self.signed = 0
        self.refused = 0

    @property
    def mutual_tls(self) -> bool:
        return isinstance(self.authorizer, SnapshotAuthorizer)

    def context(self) -> ssl.SSLContext:
        ctx = server_context(self.server_svid, self.ca.bundle_pem)
        ctx.set_alpn_protocols(["http/1.1"])
        if not self.mutual_tls:
            # Token mode: callers have no certificate yet; the token authenticates them.
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    async def start(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(
            self._handle, host, port, ssl=self.context(), limit=MAX_BODY
        )

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body = await asyncio.wait_for(self._respond(reader, writer), READ_TIMEOUT)
        except _Refused as exc:
            status, body = exc.status, {"error": str(exc)}
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError, ValueError, UnicodeError):  # fmt: skip
            status, body = 400, {"error": "malformed or incomplete request"}
        if status == 200:
            self.signed += 1
        else:
            self.refused += 1
        data = json.dumps(body).encode()
        reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
                  404: "Not Found"}[status]  # fmt: skip
        try:
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(data)}\r\nconnection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def _respond(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[int, dict[str, Any]]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        if method != "POST" or path != "/v1/sign":
            return 404, {"error": f"no route {method} {path}"}
        if not 0 < length <= MAX_BODY:
            return 400, {"error": f"body must be 1..{MAX_BODY} bytes"}
        req = json.loads(await reader.readexactly(length))
        if not isinstance(req, dict) or not isinstance(req.get("csr"), str):
            return 400, {"error": "expected JSON object with a 'csr' string"}
        ttl_raw = req.get("ttl_seconds", 86400)
        if not isinstance(ttl_raw, int) or isinstance(ttl_raw, bool) or ttl_raw <= 0:
            return 400, {"error": "'ttl_seconds' must be a positive integer"}
        ttl = min(timedelta(seconds=ttl_raw), MAX_TTL)
        csr = req["csr"].encode()
        wanted = csr_identity(csr)
        if wanted == self.identity:
            log.warning("CA: refused %s: reserved for the CA", wanted)
            return 403, {"error": f"{wanted} is reserved for the CA"}
        if isinstance(self.authorizer, SnapshotAuthorizer):
            who, allowed = self._node_caller(writer)
        else:
            who, allowed = await self._token_caller(headers, wanted)
        try:
            chain = self.ca.sign_csr(csr, ttl=ttl, allowed_ids=allowed)
        except CertificateError as exc:
            log.warning("CA: refused %s: %s", who, exc)
            return 403, {"error": str(exc)}
        log.info("CA: issued %s to %s for %s", wanted, who, ttl)
        pem = [c.public_bytes(serialization.Encoding.PEM).decode() for c in chain]
        return 200, {"chain": pem, "bundle": self.ca.bundle_pem.decode()}

    def _node_caller(self, writer: asyncio.StreamWriter) -> tuple[str, frozenset[str]]:
        assert isinstance(self.authorizer, SnapshotAuthorizer)
        ssl_obj = writer.get_extra_info("ssl_object")
        try:
            caller = check_peer(ssl_obj, None, self.ca.trust_domain)
        except PeerIdentityError as exc:
            log.warning("CA: refused a caller without a usable identity: %s", exc)
            raise _Refused(403, str(exc)) from None
        parts = SpiffeId.parse(caller).path.split("/")[1:]
        if len(parts) != 2 or parts[0] != "node":
            log.warning("CA: refused %s: only node identities may request SVIDs", caller)
            raise _Refused(403, f"{caller} is not a node identity")
        return f"node {parts[1]}", self.authorizer.allowed(parts[1])

    async def _token_caller(
        self, headers: dict[str, str], wanted: str
    ) -> tuple[str, frozenset[str]]:
        assert not isinstance(self.authorizer, SnapshotAuthorizer)
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            log.warning("CA: refused a request for %s without a bearer token", wanted)
            raise _Refused(401, "an 'Authorization: Bearer <token>' header is required")
        try:
            caller = await self.authorizer.authorize(token.strip(), wanted)
        except self.auth_errors as exc:
            log.warning("CA: refused %s: %s", wanted, exc)
            raise _Refused(403, str(exc)) from None
        return str(caller), frozenset({wanted})


class CaError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class CaClient:
    """A node's client: generates the key locally and sends only a CSR.

    Authenticates with the node certificate (`node_svid`, mutual TLS) or with a bearer token
    read from `token_file` on every request (the kubelet rotates projected tokens; a cached
    one would expire under us). Either way the server must be the CA: its certificate must
    chain to the bundle and name the CA's identity, so no other mesh member can collect our
    token or hand us certificates."""

    def __init__(
        self,
        address: tuple[str, int],
        node_svid: Svid | None,
        bundle_pem: bytes,
        *,
        token_file: str | os.PathLike[str] | None = None,
        trust_domain: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        if node_svid is None and token_file is None:
            raise ValueError("CaClient needs a node certificate or a token file")
        self.address = address
        self.token_file = Path(token_file) if token_file is not None else None
        self.timeout = timeout
        if node_svid is not None:
            self.ctx: ssl.SSLContext = client_context(node_svid, bundle_pem)
            td = trust_domain or SpiffeId.parse(node_svid.identity).trust_domain
        else:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            self.ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            self.ctx.check_hostname = False  # SPIFFE, not DNS: checked after the handshake
            self.ctx.verify_mode = ssl.CERT_REQUIRED
            self.ctx.load_verify_locations(cadata=bundle_pem.decode())
            if trust_domain is None:
                raise ValueError("a token-authenticated CaClient needs the trust domain")
            td = trust_domain
        self.ctx.set_alpn_protocols(["http/1.1"])
        self.trust_domain = td
        self.expected = frozenset({ca_identity(td)})

    def _token(self) -> str:
        assert self.token_file is not None
        try:
            token = self.token_file.read_text().strip()
        except OSError as exc:
            raise CaError(0, f"token file {self.token_file}: {exc.strerror}") from None
        if not token:
            raise CaError(0, f"token file {self.token_file} is empty")
        return token

    async def sign(self, identity: str, ttl: timedelta = timedelta(hours=24)) -> Svid:
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        body = json.dumps(
            {
                "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
                "ttl_seconds": int(ttl.total_seconds()),
            }
        ).encode()
        auth = b""
        if self.token_file is not None:
            token = await asyncio.to_thread(self._token)
            auth = f"authorization: Bearer {token}\r\n".encode()
        async with asyncio.timeout(self.timeout):
            raw = await self._exchange(body, auth)
        head, _, payload = raw.partition(b"\r\n\r\n")
        try:
            status = int(head.split(b" ", 2)[1])
            answer = json.loads(payload)
        except (IndexError, ValueError):
            raise CaError(0, f"CA at {self.address}: malformed answer") from None
        if status != 200:
            raise CaError(status, f"CA refused {identity}: {answer.get('error')}")
        chain = tuple(x509.load_pem_x509_certificate(p.encode()) for p in answer["chain"])
        return Svid(identity, key, chain)

    async def _exchange(self, body: bytes, auth: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(
            *self.address, ssl=self.ctx, server_hostname="ca.mesh"
        )
        try:
            try:
                check_peer(writer.get_extra_info("ssl_object"), self.expected, self.trust_domain)
            except PeerIdentityError as exc:
                raise CaError(0, f"{self.address} is not the CA: {exc}") from None
            writer.write(
                b"POST /v1/sign HTTP/1.1\r\nhost: ca\r\ncontent-type: application/json\r\n"
                + auth
                + f"content-length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            return await reader.read(-1)
        finally:
            writer.close()


# -- the process ----------------------------------------------------------------------------


def _addr(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{value!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The process's flags, shared by `python -m certs.service` and `meshctl ca serve`."""
    p.add_argument("--ca-dir", required=True, help="the CA directory (meshctl ca init)")
    p.add_argument(
        "--trust-domain", help="expected trust domain (refuse to start if the CA's differs)"
    )
    p.add_argument("--listen", type=_addr, default=("0.0.0.0", DEFAULT_PORT), help="HOST:PORT")
    p.add_argument("--readiness-addr", type=_addr, default=("0.0.0.0", 15021),
                   help="readiness and liveness: GET /healthz/ready")  # fmt: skip
    p.add_argument(
        "--authorizer",
        choices=["snapshot", "kubernetes"],
        default="snapshot",
        help="snapshot: node certificates + --config files; kubernetes: projected "
        "service-account tokens reviewed by the API server",
    )
    p.add_argument("--config", nargs="+", help="with snapshot: YAML files/dirs (live reload)")
    p.add_argument("--kubeconfig", help="with kubernetes: a kubeconfig (default: in-cluster)")
    p.add_argument(
        "--token-audience",
        action="append",
        help="with kubernetes: audience the tokens must carry (default ambientmesh-ca)",
    )
    p.add_argument(
        "--ztunnel-service-account",
        action="append",
        metavar="NS/NAME",
        help="with kubernetes: service accounts of node proxies "
        "(default ambientmesh-system/ztunnel)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ambientmesh-ca", description=__doc__.split("\n")[0])
    add_arguments(p)
    return p


def check_args(args: argparse.Namespace) -> str | None:
    """A usage error, or None (argparse cannot express the per-authorizer requirements)."""
    if args.authorizer == "snapshot":
        if not args.config:
            return "--authorizer snapshot needs --config FILE..."
        for flag in ("kubeconfig", "token_audience", "ztunnel_service_account"):
            if getattr(args, flag):
                return f"--{flag.replace('_', '-')} applies to --authorizer kubernetes only"
    elif args.config:
        return "--config applies to --authorizer snapshot only"
    for sa in args.ztunnel_service_account or ():
        ns, sep, name = sa.partition("/")
        if not sep or not ns or not name:
            return f"--ztunnel-service-account {sa!r}: expected NAMESPACE/NAME"
    return None


class CaProcess:
    """Everything the process opens, so that SIGTERM closes it in one place."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ready = False
        self.stop = asyncio.Event()

    async def run(self) -> None:
        from mesh.config.source import ConfigStore, FileSource
        from mesh.observability import ObservabilityServer

        args = self.args
        ca = await asyncio.to_thread(CertificateAuthority.load, args.ca_dir)
        if args.trust_domain and args.trust_domain != ca.trust_domain:
            raise CertificateError(
                f"--trust-domain {args.trust_domain}: the CA in {args.ca_dir} is for "
                f"{ca.trust_domain}"
            )
        async with AsyncExitStack() as stack, asyncio.TaskGroup() as tg:
            ready_srv = ObservabilityServer(*args.readiness_addr, ready=lambda: self.ready)
            await stack.enter_async_context(ready_srv)
            bg: list[asyncio.Task[None]] = []
            service: CaService
            if args.authorizer == "snapshot":
                store = ConfigStore()
                fsrc = FileSource(args.config, store, trust_domain=ca.trust_domain)
                fsrc.load_initial()
                bg.append(tg.create_task(fsrc.run()))
                service = CaService(ca, SnapshotAuthorizer(lambda: store.current))
            else:
                from certs.kube_auth import (
                    DEFAULT_AUDIENCE,
                    AuthorizationError,
                    TokenReviewAuthorizer,
                )
                from mesh.config.kube import load_api_client

                api = await load_api_client(args.kubeconfig)
                stack.push_async_callback(api.close)
                authz = TokenReviewAuthorizer(
                    api,
                    trust_domain=ca.trust_domain,
                    ztunnel_service_accounts=args.ztunnel_service_account
                    or ("ambientmesh-system/ztunnel",),
                    audiences=tuple(args.token_audience or (DEFAULT_AUDIENCE,)),
                )
                service = CaService(ca, authz, auth_errors=(AuthorizationError,))
            server = await service.start(*args.listen)
            port = server.sockets[0].getsockname()[1]
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop.set)
            self.ready = True
            log.info(
                "CA for %s serving on %d (%s authorizer), readiness %d",
                ca.trust_domain, port, args.authorizer, ready_srv.port,
            )  # fmt: skip
            print(f"ready ca={port} readiness={ready_srv.port}", flush=True)
            await self.stop.wait()
            log.info("CA stopping after %d issued, %d refused", service.signed, service.refused)
            self.ready = False
            server.close()
            for t in bg:
                t.cancel()


def run(args: argparse.Namespace) -> int:
    from mesh import process

    problem = check_args(args)
    if problem is not None:
        print(f"ambientmesh-ca: {problem}", file=sys.stderr)
        return 2
    return process.run("ambientmesh-ca", _unwrap(CaProcess(args).run()), log_level=args.log_level)


async def _unwrap(coro: Awaitable[None]) -> None:
    """A startup failure leaves as itself, not inside the TaskGroup's exception group, so
    `process.run` turns it into exit code 2 with its message."""
    try:
        await coro
    except BaseExceptionGroup as eg:
        leaves = [e for e in _leaves(eg) if not isinstance(e, asyncio.CancelledError)]
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(eg: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in eg.exceptions:
        out += _leaves(e) if isinstance(e, BaseExceptionGroup) else [e]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
