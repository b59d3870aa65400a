"""The node's client of the CA service: the key is made here, only a CSR travels.

Both proxies sign through it (`--ca`), so it sits on the shared floor beside the certificate
manager, apart from the CA service it talks to (as istio/ztunnel keeps identity/caclient)."""

from __future__ import annotations

import asyncio
import json
import ssl
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh.identity.spiffe import SpiffeId, node_id
from mesh.identity.svid import Svid
from mesh.tls import PeerIdentityError, check_peer, client_context


class CaError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class CaClient:
    """A node's client: generates the key locally and sends only a CSR.

    It authenticates with its node certificate (`node_svid`) or, on Kubernetes, with the
    service-account token in `token_file`, re-read for every request because the kubelet
    rotates projected tokens. Either way the CA must prove it is the CA
    (`spiffe://<td>/node/ca`), not merely some holder of a mesh certificate: a token sent to
    an impostor could be replayed."""

    def __init__(
        self,
        address: tuple[str, int],
        node_svid: Svid | None,
        bundle_pem: bytes,
        *,
        token_file: str | Path | None = None,
    ) -> None:
        if node_svid is None and token_file is None:
            raise ValueError("the CA client needs a node certificate or a token file")
        self.address = address
        self.node_svid = node_svid
        self.token_file = Path(token_file) if token_file is not None else None
        self.bundle_pem = bundle_pem  # the latest trust bundle the CA answered with
        self.ctx = self._context()

    def _context(self) -> ssl.SSLContext:
        if self.node_svid is not None:
            ctx = client_context(self.node_svid, self.bundle_pem)
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.check_hostname = False  # SPIFFE: the URI SAN is checked after the handshake
            ctx.load_verify_locations(cadata=self.bundle_pem.decode())
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    async def _auth_header(self) -> bytes:
        if self.token_file is None:
            return b""
        try:
            token = (await asyncio.to_thread(self.token_file.read_text)).strip()
        except OSError as exc:
            raise CaError(0, f"token {self.token_file}: {exc.strerror}") from None
        return f"authorization: Bearer {token}\r\n".encode()

    async def sign(self, identity: str, ttl: timedelta = timedelta(hours=24)) -> Svid:
        trust_domain = SpiffeId.parse(identity).trust_domain
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
        auth = await self._auth_header()
        reader, writer = await asyncio.open_connection(
            *self.address, ssl=self.ctx, server_hostname="ca.mesh"
        )
        try:
            ca_id = node_id(trust_domain, "ca")
            try:
                check_peer(writer.get_extra_info("ssl_object"), {ca_id}, trust_domain)
            except PeerIdentityError as exc:
                where = f"{self.address[0]}:{self.address[1]}"
                raise CaError(0, f"{where} is not the CA: {exc}") from None
            writer.write(
                b"POST /v1/sign HTTP/1.1\r\nhost: ca\r\ncontent-type: application/json\r\n"
                + auth
                + f"content-length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            raw = await reader.read(-1)
        finally:
            writer.close()
        head, _, payload = raw.partition(b"\r\n\r\n")
        try:
            status = int(head.split(b" ", 2)[1])
            answer = json.loads(payload)
        except (IndexError, ValueError):
            raise CaError(0, f"CA answered garbage: {raw[:80]!r}") from None
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
