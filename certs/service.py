"""The CA service: nodes' ztunnels obtain workload SVIDs over TLS.

A node proves who it is in one of two ways:
* its node certificate (`spiffe://<td>/node/<name>`) over mutual TLS; it may then get the
  identities of pods the config places on that node, plus its own node identity for renewal
  (`SnapshotAuthorizer`: single hosts and the lab);
* on Kubernetes, its projected service-account token as `Authorization: Bearer`, reviewed by
  the API server (`certs.kube_auth.TokenReviewAuthorizer`), which also decides which pods run
  on the caller's node, as Istio's CA does. The TLS is then server-authenticated only: a
  fresh ztunnel has no certificate yet.
Either way a compromised node cannot mint other nodes' identities (DESIGN.md §2). Everything
refused is logged with who asked, for what, and why.

Wire format, small on purpose: HTTP/1.1 `POST /v1/sign` with JSON
`{"csr": "<PEM>", "ttl_seconds": 86400}` → 200 `{"chain": ["<PEM>", ...], "bundle": "<PEM>"}`,
or 4xx `{"error": "..."}`. Keys never leave the node: only the CSR travels.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import ssl
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certs.ca import MAX_TTL, CertificateAuthority
from mesh.config.snapshot import Snapshot
from mesh.httpserver import HttpError, Request, read_request, render, send_and_close
from mesh.identity.spiffe import SpiffeId, node_id
from mesh.identity.svid import CertificateError
from mesh.ports import CA_PORT
from mesh.tls import PeerIdentityError, check_peer, server_context

log = logging.getLogger("certs.service")
MAX_BODY = 64 * 1024
READ_TIMEOUT = 10.0


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
    """Decides from a bearer token (`certs.kube_auth.TokenReviewAuthorizer`); raises
    `certs.kube_auth.AuthorizationError` with the reason when the caller may not."""

    async def authorize(self, token: str, identity: str) -> object: ...


class CaService:
    def __init__(
        self,
        ca: CertificateAuthority,
        authorizer: SnapshotAuthorizer | None,
        *,
        tokens: TokenAuthorizer | None = None,
    ) -> None:
        if authorizer is None and tokens is None:
            raise ValueError("the CA service needs a node-certificate or a token authorizer")
        self.ca = ca
        self.authorizer = authorizer
        self.tokens = tokens
        self.server_svid = ca.issue(node_id(ca.trust_domain, "ca"), timedelta(days=30))

    async def start(self, host: str, port: int) -> asyncio.Server:
        ctx = server_context(self.server_svid, self.ca.bundle_pem)
        if self.tokens is not None:
            ctx.verify_mode = ssl.CERT_OPTIONAL  # token callers have no certificate yet
        ctx.set_alpn_protocols(["http/1.1"])
        return await asyncio.start_server(self._handle, host, port, ssl=ctx, limit=MAX_BODY)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body = await asyncio.wait_for(self._exchange(reader, writer), READ_TIMEOUT)
        except (TimeoutError, HttpError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError, ValueError):  # fmt: skip
            status, body = 400, {"error": "malformed or incomplete request"}
        data = render(status, "application/json", json.dumps(body).encode())
        await send_and_close(writer, data, wait_closed=False)

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[int, dict[str, Any]]:
        """Read one request (the whole exchange is bounded by `_handle`) and answer it."""
        req = await read_request(reader, within=READ_TIMEOUT)
        return await self._respond(req, reader, writer)

    async def _respond(
        self, req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[int, dict[str, Any]]:
        method, path = req.method, req.target
        length, token = req.content_length(), ""
        scheme, _, cred = req.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            token = cred.strip()
        if method != "POST" or path != "/v1/sign":
            return 404, {"error": f"no route {method} {path}"}
        if not 0 < length <= MAX_BODY:
            return 400, {"error": f"body must be 1..{MAX_BODY} bytes"}
        req = json.loads(await reader.readexactly(length))
        if not isinstance(req, dict) or not isinstance(req.get("csr"), str):
            return 400, {"error": "expected JSON object with a 'csr' string"}
        ttl = min(timedelta(seconds=int(req.get("ttl_seconds", 86400))), MAX_TTL)
        csr = req["csr"].encode()
        try:
            wanted = requested_identity(csr)
        except CertificateError as exc:
            return 400, {"error": str(exc)}
        if wanted == self.server_svid.identity:
            # whoever held it could pose as the CA and collect other nodes' tokens; a node
            # that happens to be named "ca" must not get it either
            log.warning("CA: refused a request for the CA's own identity %s", wanted)
            return 403, {"error": f"{wanted} is the CA's own identity"}
        ssl_obj = writer.get_extra_info("ssl_object")
        if ssl_obj.getpeercert(binary_form=True) is None:
            if self.tokens is None:
                return 401, {"error": "a node certificate is required"}
            return await self._sign_for_token(csr, ttl, token)
        if self.authorizer is None:
            return 401, {"error": "this CA authenticates by service-account token"}
        try:
            caller = check_peer(ssl_obj, None, self.ca.trust_domain)
        except PeerIdentityError as exc:
            log.warning("CA: refused a caller without a usable identity: %s", exc)
            return 403, {"error": str(exc)}
        parts = SpiffeId.parse(caller).path.split("/")[1:]
        if len(parts) != 2 or parts[0] != "node":
            log.warning("CA: refused %s: only node identities may request SVIDs", caller)
            return 403, {"error": f"{caller} is not a node identity"}
        try:
            chain = self.ca.sign_csr(csr, ttl=ttl, allowed_ids=self.authorizer.allowed(parts[1]))
        except CertificateError as exc:
            log.warning("CA: refused node %s: %s", parts[1], exc)
            return 403, {"error": str(exc)}
        return self._answer(chain)

    async def _sign_for_token(
        self, csr: bytes, ttl: timedelta, token: str
    ) -> tuple[int, dict[str, Any]]:
        from certs.kube_auth import AuthorizationError

        assert self.tokens is not None
        if not token:
            return 401, {"error": "no node certificate and no bearer token"}
        try:
            identity = requested_identity(csr)
            await self.tokens.authorize(token, identity)
            chain = self.ca.sign_csr(csr, ttl=ttl, allowed_ids=frozenset({identity}))
        except (AuthorizationError, CertificateError) as exc:
            log.warning("CA: refused a token caller: %s", exc)
            return 403, {"error": str(exc)}
        return self._answer(chain)

    def _answer(self, chain: Sequence[x509.Certificate]) -> tuple[int, dict[str, Any]]:
        pem = [c.public_bytes(serialization.Encoding.PEM).decode() for c in chain]
        return 200, {"chain": pem, "bundle": self.ca.bundle_pem.decode()}


def requested_identity(csr_pem: bytes) -> str:
    """The one URI SAN a CSR asks for, before anyone decides whether it may have it; the
    CA's own checks (`sign_csr`) still run on the whole CSR afterwards."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        raise CertificateError("CSR: unreadable, or no subjectAltName") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise CertificateError("CSR: exactly one SPIFFE URI SAN needed")
    return str(uris[0])


# -- the process (`python -m certs.service`, `meshctl ca serve`) ---------------------------


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Shared by `python -m certs.service` and `meshctl ca serve`."""
    p.add_argument("--ca-dir", required=True, help="the CA directory (meshctl ca init)")
    p.add_argument("--trust-domain", help="refuse to start unless the CA is for this domain")
    p.add_argument("--listen", type=_hostport, default=("0.0.0.0", CA_PORT), metavar="HOST:PORT")
    p.add_argument(
        "--authorizer",
        choices=["snapshot", "kubernetes"],
        default="snapshot",
        help="snapshot: nodes present node certificates, pods placed by --config; "
        "kubernetes: nodes present service-account tokens (TokenReview)",
    )
    p.add_argument("--config", nargs="+", help="with snapshot: YAML files (reloaded live)")
    p.add_argument("--kubeconfig", help="with kubernetes: a kubeconfig (default: in-cluster)")
    p.add_argument("--token-audience", default="ambientmesh-ca", help="with kubernetes")
    p.add_argument(
        "--ztunnel-service-account",
        action="append",
        metavar="NS/SA",
        help="with kubernetes: the ztunnels' service account "
        "(default ambientmesh-system/ztunnel; repeatable)",
    )
    p.add_argument("--readiness-addr", type=_hostport, metavar="HOST:PORT")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


async def serve_forever(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT. Prints `ready ca=<port>` once listening (for scripts)."""
    from mesh.config.source import ConfigStore, FileSource
    from mesh.observability import ObservabilityServer

    ca = await asyncio.to_thread(CertificateAuthority.load, args.ca_dir)
    if args.trust_domain and args.trust_domain != ca.trust_domain:
        raise CertificateError(
            f"--trust-domain {args.trust_domain}: the CA in {args.ca_dir} is for {ca.trust_domain}"
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks: list[asyncio.Task[Any]] = []
    api: Any = None
    authorizer: SnapshotAuthorizer | None = None
    tokens: TokenAuthorizer | None = None
    if args.authorizer == "snapshot":
        if not args.config:
            raise CertificateError("--authorizer snapshot needs --config FILE...")
        store = ConfigStore()
        source = FileSource(args.config, store, trust_domain=ca.trust_domain)
        source.load_initial()
        tasks.append(asyncio.create_task(source.run()))
        authorizer = SnapshotAuthorizer(lambda: store.current)
    else:
        from certs.kube_auth import TokenReviewAuthorizer
        from mesh.config.kube import load_api_client

        api = await load_api_client(args.kubeconfig)
        tokens = TokenReviewAuthorizer(
            api,
            trust_domain=ca.trust_domain,
            ztunnel_service_accounts=args.ztunnel_service_account
            or ("ambientmesh-system/ztunnel",),
            audiences=(args.token_audience,),
        )
    server = await CaService(ca, authorizer, tokens=tokens).start(*args.listen)
    ready: Any = None
    if args.readiness_addr:
        ready = ObservabilityServer(*args.readiness_addr, ready=lambda: True)
        await ready.start()
    port = server.sockets[0].getsockname()[1]
    print(f"ready ca={port}", flush=True)
    log.info(
        "CA for %s serving on %s:%d (%s authorizer)",
        ca.trust_domain, args.listen[0], port, args.authorizer,
    )  # fmt: skip
    try:
        await stop.wait()
    finally:
        log.info("CA stopping")
        server.close()
        if ready is not None:
            await ready.close()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if api is not None:
            await api.close()
    return 0


def run(args: argparse.Namespace) -> int:
    """Serve; a CA, config or address that cannot be used is one clear line and exit 2."""
    from mesh.config.parse import ConfigErrors

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        return asyncio.run(serve_forever(args))
    except (CertificateError, ConfigErrors, OSError) as exc:
        print(f"ambientmesh-ca: {exc}", flush=True, file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ambientmesh-ca", description="the mesh CA service")
    add_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
