"""The CA service: nodes' ztunnels obtain workload SVIDs over mutual TLS.

A node proves who it is with its node certificate (`spiffe://<td>/node/<name>`) and may get
identities only of pods the config places on that node, plus its own node identity for
renewal: a compromised node cannot mint other nodes' identities (DESIGN.md §2). Everything
refused is logged with who asked, for what, and why.

Wire format, small on purpose: HTTP/1.1 `POST /v1/sign` with JSON
`{"csr": "<PEM>", "ttl_seconds": 86400}` → 200 `{"chain": ["<PEM>", ...], "bundle": "<PEM>"}`,
or 4xx `{"error": "..."}`. Keys never leave the node: only the CSR travels.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Callable
from datetime import timedelta
from typing import Any

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


class SnapshotAuthorizer:
    """A node may have the identities of the pods the config schedules on it."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def allowed(self, node: str) -> frozenset[str]:
        snap = self.snapshot()
        ids = {snap.identity(p) for p in snap.pods_on_node(node)}
        ids.add(node_id(snap.trust_domain, node))
        return frozenset(ids)


class CaService:
    def __init__(self, ca: CertificateAuthority, authorizer: SnapshotAuthorizer) -> None:
        self.ca = ca
        self.authorizer = authorizer
        self.server_svid = ca.issue(node_id(ca.trust_domain, "ca"), timedelta(days=30))

    async def start(self, host: str, port: int) -> asyncio.Server:
        ctx = server_context(self.server_svid, self.ca.bundle_pem)
        ctx.set_alpn_protocols(["http/1.1"])
        return await asyncio.start_server(self._handle, host, port, ssl=ctx, limit=MAX_BODY)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body = await asyncio.wait_for(self._respond(reader, writer), READ_TIMEOUT)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError, ValueError):  # fmt: skip
            status, body = 400, {"error": "malformed or incomplete request"}
        data = json.dumps(body).encode()
        reason = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found"}[status]
        try:
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(data)}\r\nconnection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _respond(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[int, dict[str, Any]]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if method != "POST" or path != "/v1/sign":
            return 404, {"error": f"no route {method} {path}"}
        if not 0 < length <= MAX_BODY:
            return 400, {"error": f"body must be 1..{MAX_BODY} bytes"}
        req = json.loads(await reader.readexactly(length))
        if not isinstance(req, dict) or not isinstance(req.get("csr"), str):
            return 400, {"error": "expected JSON object with a 'csr' string"}
        ssl_obj = writer.get_extra_info("ssl_object")
        try:
            caller = check_peer(ssl_obj, None, self.ca.trust_domain)
        except PeerIdentityError as exc:
            log.warning("CA: refused a caller without a usable identity: %s", exc)
            return 403, {"error": str(exc)}
        parts = SpiffeId.parse(caller).path.split("/")[1:]
        if len(parts) != 2 or parts[0] != "node":
            log.warning("CA: refused %s: only node identities may request SVIDs", caller)
            return 403, {"error": f"{caller} is not a node identity"}
        ttl = timedelta(seconds=int(req.get("ttl_seconds", 86400)))
        ttl = min(ttl, MAX_TTL)
        try:
            chain = self.ca.sign_csr(
                req["csr"].encode(), ttl=ttl, allowed_ids=self.authorizer.allowed(parts[1])
            )
        except CertificateError as exc:
            log.warning("CA: refused node %s: %s", parts[1], exc)
            return 403, {"error": str(exc)}
        pem = [c.public_bytes(serialization.Encoding.PEM).decode() for c in chain]
        return 200, {"chain": pem, "bundle": self.ca.bundle_pem.decode()}


class CaError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class CaClient:
    """A node's client: generates the key locally and sends only a CSR."""

    def __init__(self, address: tuple[str, int], node_svid: Svid, bundle_pem: bytes) -> None:
        self.address = address
        self.node_svid = node_svid
        self.bundle_pem = bundle_pem  # the latest trust bundle the CA answered with
        self.ctx = self._context()

    def _context(self) -> ssl.SSLContext:
        ctx = client_context(self.node_svid, self.bundle_pem)
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

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
        reader, writer = await asyncio.open_connection(
            *self.address, ssl=self.ctx, server_hostname="ca.mesh"
        )
        try:
            writer.write(
                b"POST /v1/sign HTTP/1.1\r\nhost: ca\r\ncontent-type: application/json\r\n"
                + f"content-length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            raw = await reader.read(-1)
        finally:
            writer.close()
        head, _, payload = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        answer = json.loads(payload)
        if status != 200:
            raise CaError(status, f"CA refused {identity}: {answer.get('error')}")
        chain = tuple(x509.load_pem_x509_certificate(p.encode()) for p in answer["chain"])
        bundle = answer.get("bundle")
        if isinstance(bundle, str) and bundle.encode() != self.bundle_pem:
            # a root added for rotation: trust it from now on, here and (through
            # `Identities`) on every mesh connection
            x509.load_pem_x509_certificates(bundle.encode())  # refuse garbage before using it
            self.bundle_pem = bundle.encode()
            self.ctx = self._context()
        return Svid(identity, key, chain)
