"""The user-space handshake, sans-IO: pyOpenSSL contexts whose keylog hands us the traffic
secrets (the stdlib hides them), and a memory-BIO driver fed one whole record at a time so
the sequence numbers the kernel starts from are exact."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto

from mesh.identity.svid import Svid
from mesh.ktls.abi import CIPHERS
from mesh.ktls.errors import KtlsError
from mesh.ktls.keys import DirectionKeys, TrafficKeys, traffic_keys
from mesh.ktls.probe import probe
from mesh.ktls.records import count_records
from mesh.tls import ALPN_H2

# -- TLS contexts (pyOpenSSL: the stdlib hides the traffic secrets) ------------------------


class _Secrets:
    """Per-connection traffic secrets, filled by the context's keylog callback."""

    __slots__ = ("client", "client_random", "server")

    def __init__(self) -> None:
        self.client_random = b""
        self.client: bytes | None = None
        self.server: bytes | None = None


def _keylog(conn: SSL.Connection, line: bytes) -> None:
    """OpenSSL hands every secret of every connection of the context here; keep only the
    application traffic secrets, and only for the connection whose client random they name."""
    label, _, rest = line.partition(b" ")
    if label not in (b"CLIENT_TRAFFIC_SECRET_0", b"SERVER_TRAFFIC_SECRET_0"):
        return
    secrets = conn.get_app_data()
    if not isinstance(secrets, _Secrets):
        return
    random_hex, _, secret_hex = rest.partition(b" ")
    if not secrets.client_random:
        secrets.client_random = conn.client_random() or b""
    if bytes.fromhex(random_hex.decode()) != secrets.client_random:
        return
    if label == b"CLIENT_TRAFFIC_SECRET_0":
        secrets.client = bytes.fromhex(secret_hex.decode())
    else:
        secrets.server = bytes.fromhex(secret_hex.decode())


@dataclass(frozen=True)
class KtlsContext:
    """A pyOpenSSL context set up like `mesh.tls`'s: TLS 1.3 only, mutual, ALPN h2, chain
    verified against the trust bundle; SPIFFE checks happen after the handshake."""

    ssl: SSL.Context
    server_side: bool
    ciphers: tuple[str, ...]


def _kernel_ciphers(ciphers: Sequence[str] | None) -> tuple[str, ...]:
    if ciphers is None:
        support = probe()
        ciphers = support.ciphers if support.available else tuple(CIPHERS)
    unknown = [c for c in ciphers if c not in CIPHERS]
    if unknown or not ciphers:
        raise ValueError(f"ktls ciphers: {unknown or 'none'} not among {sorted(CIPHERS)}")
    return tuple(ciphers)


def _context(
    svid: Svid, bundle_pem: bytes, server_side: bool, ciphers: Sequence[str] | None
) -> KtlsContext:
    suites = _kernel_ciphers(ciphers)
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    # Only suites the kernel can take over: negotiating one it cannot would strand us.
    ctx.set_tls13_ciphersuites(":".join(suites).encode())
    ctx.use_privatekey(svid.key)
    ctx.use_certificate(svid.leaf)
    for cert in svid.chain[1:]:
        ctx.add_extra_chain_cert(cert)
    ctx.check_privatekey()
    store = ctx.get_cert_store()
    assert store is not None
    for cert in x509.load_pem_x509_certificates(bundle_pem):
        store.add_cert(crypto.X509.from_cryptography(cert))
    mode = SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if server_side else 0)
    ctx.set_verify(mode)
    ctx.set_keylog_callback(_keylog)
    # pyOpenSSL cannot set num_tickets = 0; stateful tickets with no cache are the smallest,
    # and the record accounting below copes with any number of them.
    ctx.set_options(SSL.OP_NO_TICKET)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    if server_side:
        ctx.set_alpn_select_callback(_select_h2)
    else:
        ctx.set_alpn_protos([ALPN_H2.encode()])
    return KtlsContext(ctx, server_side, suites)


def _select_h2(conn: SSL.Connection, offered: list[bytes]) -> Any:
    return ALPN_H2.encode() if ALPN_H2.encode() in offered else SSL.NO_OVERLAPPING_PROTOCOLS


def client_context(
    svid: Svid, bundle_pem: bytes, ciphers: Sequence[str] | None = None
) -> KtlsContext:
    return _context(svid, bundle_pem, False, ciphers)


def server_context(
    svid: Svid, bundle_pem: bytes, ciphers: Sequence[str] | None = None
) -> KtlsContext:
    return _context(svid, bundle_pem, True, ciphers)


# -- the handshake, sans-IO ----------------------------------------------------------------


class Handshake:
    """Drives one pyOpenSSL handshake over memory BIOs, one whole record at a time.

    Feeding exactly one record per step is what makes the sequence numbers exact: when the
    handshake completes, OpenSSL has consumed nothing past the peer's last handshake record,
    so everything still in the socket is the kernel's from record 0 on (a server's session
    tickets included: the kernel reports them as handshake records and we skip them). On our
    side, the records OpenSSL emits in the step that completes a *server* handshake are its
    session tickets, already under the application key: they set the TX sequence number."""

    def __init__(self, ctx: KtlsContext) -> None:
        self.ctx = ctx
        self.conn = SSL.Connection(ctx.ssl, None)
        self.secrets = _Secrets()
        self.conn.set_app_data(self.secrets)
        if ctx.server_side:
            self.conn.set_accept_state()
        else:
            self.conn.set_connect_state()
        self.done = False
        self.tx_seq = 0

    def _output(self) -> bytes:
        out = bytearray()
        while True:
            try:
                chunk = self.conn.bio_read(65536)
            except SSL.WantReadError:
                return bytes(out)
            if not chunk:
                return bytes(out)
            out += chunk

    def step(self, record: bytes | None) -> bytes:
        """Feed one record (None to start); returns bytes to send. Raises KtlsError on a
        failed handshake, after which `alert()` has the alert OpenSSL wants sent."""
        if record:
            self.conn.bio_write(record)
        try:
            self.conn.do_handshake()
        except SSL.WantReadError:
            return self._output()
        except SSL.Error as exc:
            self._failed_output = self._output()
            raise KtlsError(f"TLS handshake failed: {_ssl_reason(exc)}") from None
        out = self._output()
        self.done = True
        if self.ctx.server_side:
            self.tx_seq = count_records(out)
        return out

    def alert(self) -> bytes:
        return getattr(self, "_failed_output", b"")

    def keys(self) -> TrafficKeys:
        """The application traffic keys, once `done`."""
        if not self.done:
            raise KtlsError("handshake not complete")
        if self.conn.get_protocol_version_name() != "TLSv1.3":
            raise KtlsError(f"negotiated {self.conn.get_protocol_version_name()}, need TLSv1.3")
        name = self.conn.get_cipher_name() or ""
        spec = CIPHERS.get(name)
        if spec is None:
            raise KtlsError(f"negotiated cipher {name!r} has no kernel offload")
        s = self.secrets
        if s.client is None or s.server is None:
            raise KtlsError("traffic secrets were not logged for this connection")
        ckey, civ = traffic_keys(spec, s.client)
        skey, siv = traffic_keys(spec, s.server)
        client = DirectionKeys(ckey, civ, 0)
        server = DirectionKeys(skey, siv, 0)
        if self.ctx.server_side:
            return TrafficKeys(spec, DirectionKeys(skey, siv, self.tx_seq), client)
        return TrafficKeys(spec, client, server)

    def peer_der(self) -> bytes | None:
        cert = self.conn.get_peer_certificate(as_cryptography=True)
        return cert.public_bytes(serialization.Encoding.DER) if cert is not None else None

    def alpn(self) -> str | None:
        proto = self.conn.get_alpn_proto_negotiated()
        return proto.decode() if proto else None


def _ssl_reason(exc: SSL.Error) -> str:
    parts = [str(e[2]) for e in (exc.args[0] if exc.args and isinstance(exc.args[0], list) else [])]
    return "; ".join(p for p in parts if p) or str(exc) or type(exc).__name__
