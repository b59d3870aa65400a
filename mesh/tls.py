"""TLS contexts for mesh connections, and the SPIFFE checks OpenSSL cannot do for us.

OpenSSL verifies the chain against the trust bundle and the validity period; it knows nothing
of SPIFFE, so hostname checking is off and every caller checks the peer's URI SAN with
`check_peer` after the handshake. Keys go to OpenSSL through an anonymous memory file
(`memfd_create`), because `SSLContext.load_cert_chain` only takes paths and keys must never
touch disk (DESIGN.md §2).
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import socket
import ssl
from asyncio import sslproto
from collections.abc import Callable, Collection
from typing import Any, ClassVar

from cryptography import x509

from mesh.identity.spiffe import SpiffeId
from mesh.identity.svid import Svid

log = logging.getLogger("mesh.tls")

ALPN_H2 = "h2"


class PeerIdentityError(Exception):
    """The peer's certificate is valid but does not name an identity we accept."""


def _load_svid(ctx: ssl.SSLContext, svid: Svid) -> None:
    fd = os.memfd_create("svid", os.MFD_CLOEXEC)
    try:
        os.write(fd, svid.key_pem() + svid.chain_pem())
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _base(purpose: ssl.Purpose, svid: Svid, bundle_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(
        ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=bundle_pem.decode())
    ctx.set_alpn_protocols([ALPN_H2])
    _load_svid(ctx, svid)
    return ctx


def server_context(svid: Svid, bundle_pem: bytes) -> ssl.SSLContext:
    """Mutual TLS 1.3 server. No session tickets: with none, both directions' record
    sequence numbers start at 0 after the handshake, which kTLS offload relies on."""
    ctx = _base(ssl.Purpose.CLIENT_AUTH, svid, bundle_pem)
    ctx.num_tickets = 0
    return ctx


def client_context(svid: Svid, bundle_pem: bytes) -> ssl.SSLContext:
    return _base(ssl.Purpose.SERVER_AUTH, svid, bundle_pem)


def identity_from_der(der: bytes) -> str | None:
    """The certificate's single URI SAN, or None when it has none or several."""
    try:
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if len(uris) == 1 else None


def peer_identity(ssl_obj: ssl.SSLObject | ssl.SSLSocket) -> str | None:
    der = ssl_obj.getpeercert(binary_form=True)
    return identity_from_der(der) if der else None


def check_peer(
    ssl_obj: ssl.SSLObject | ssl.SSLSocket,
    expected: Collection[str] | None,
    trust_domain: str,
) -> str:
    """The peer's SPIFFE ID, if it is in our trust domain and (when given) in `expected`."""
    return check_identity(peer_identity(ssl_obj), expected, trust_domain)


def check_identity(
    identity: str | None, expected: Collection[str] | None, trust_domain: str
) -> str:
    if identity is None:
        raise PeerIdentityError("peer certificate has no single SPIFFE URI SAN")
    try:
        sid = SpiffeId.parse(identity)
    except ValueError as exc:
        raise PeerIdentityError(str(exc)) from None
    if sid.trust_domain != trust_domain:
        raise PeerIdentityError(f"peer {identity} is not in trust domain {trust_domain}")
    if expected is not None and identity not in expected:
        raise PeerIdentityError(f"peer {identity} is not the expected {sorted(expected)}")
    return identity


# -- TLS over asyncio's own protocol ---------------------------------------------------------


class _TlsProtocol(sslproto.SSLProtocol):
    """asyncio's TLS protocol, used instead of the event loop's own (uvloop's), which keeps
    native memory of every TLS connection after it has closed: measured 11 to 20 MiB per
    1,000 connections, never returned (MagicStack/uvloop#565), so a peer that opens and
    closes connections would grow the proxy without bound. This one returns it all.

    asyncio zero-fills its 256 KiB read buffer, so all of it would be resident for the
    connection's life. Here it is an anonymous mapping instead: a page costs memory only once
    ciphertext has been read into it, so an idle connection holds none of it."""

    _fast: ClassVar[bool | None] = None  # the fast path below usable on this Python (once known)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # An instance value, deliberately shadowing asyncio's class one: its __init__
        # allocates (and zero-fills) that much, and get_buffer reads at most that much.
        self.max_size = 1  # type: ignore[misc]
        super().__init__(*args, **kwargs)
        self.max_size = TLS_READ_BUFFER  # type: ignore[misc]
        self._ssl_buffer = mmap.mmap(-1, TLS_READ_BUFFER)
        self._ssl_buffer_view = memoryview(self._ssl_buffer)
        cls = type(self)
        if cls._fast is None:  # once: does this Python's asyncio have what the fast path reads?
            cls._fast = all(hasattr(self, a) for a in _ASYNCIO_INTERNALS)
            if not cls._fast:
                log.warning("asyncio's TLS internals differ from Python 3.11's: TLS fast path off")

    # The steady state's hot path. A profile of ztunnel at 1,000 req/s (one request per
    # wakeup) found asyncio's TLS layer the largest share of its Python work: per read about
    # a dozen calls, a 256 KiB allocation for each record and an SSLWantReadError raised and
    # caught to learn that the input is used up; per write the backlog list, its bookkeeping
    # and three more calls. Here an established connection (WRAPPED, nothing queued, nothing
    # paused) reads exactly the records that arrived and writes straight through; every
    # other state, and anything unusual, takes asyncio's own path unchanged.

    def get_buffer(self, n: int) -> memoryview:
        # asyncio's sizes a buffer each time; this one is fixed at max_size
        return self._ssl_buffer_view

    def buffer_updated(self, nbytes: int) -> None:
        p: Any = self  # asyncio's private attributes: not in the stubs
        if (
            not self._fast
            or p._state is not _WRAPPED
            or p._app_reading_paused
            or p._app_protocol_is_buffer
            or p._sslobj is None
        ):
            super().buffer_updated(nbytes)
            return
        incoming = p._incoming
        incoming.write(p._ssl_buffer_view[:nbytes])
        try:
            p._read_records()
            if p._write_backlog:
                p._do_write()
            elif p._outgoing.pending:  # e.g. an answer to a KeyUpdate
                p._process_outgoing()
            elif p._app_reading_paused or p._write_buffer_size >= p._outgoing_high_water:
                p._control_app_writing()
            if p._ssl_reading_paused or incoming.pending >= p._incoming_high_water:
                p._control_ssl_reading()
        except Exception as ex:
            p._fatal_error(ex, "Fatal error on SSL protocol")

    def _read_records(self) -> None:
        """asyncio's `_do_read__copied`, sized by what arrived: plaintext is never longer
        than its ciphertext, so asking for `incoming.pending` bytes allocates no more than
        needed, and with the input used up and nothing decrypted left over there is no need
        to ask again (and be told so with an exception). A partial record still ends in
        SSLWantReadError, as before."""
        p: Any = self  # asyncio's private attributes: not in the stubs
        sslobj = p._sslobj
        incoming = p._incoming
        chunks: list[bytes] = []
        chunk = b"1"
        try:
            while True:
                want = incoming.pending or sslobj.pending() or p.max_size
                chunk = sslobj.read(min(want, p.max_size))
                if not chunk:
                    break
                chunks.append(chunk)
                if not incoming.pending and not sslobj.pending():
                    break
        except _AGAIN:
            pass
        if chunks:
            p._app_protocol.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if not chunk:  # close_notify
            p._call_eof_received()
            p._start_shutdown()

    def _write_appdata(self, list_of_data: Any) -> None:
        p: Any = self  # asyncio's private attributes: not in the stubs
        if (
            not self._fast
            or p._state is not _WRAPPED
            or p._write_backlog
            or p._ssl_writing_paused
            or type(list_of_data) is not tuple
            or len(list_of_data) != 1
            or p._sslobj is None
        ):
            super()._write_appdata(list_of_data)
            return
        try:
            p._sslobj.write(list_of_data[0])
        except _AGAIN:  # the TLS layer cannot take it now: asyncio's backlog keeps it
            super()._write_appdata(list(list_of_data))
            return
        except Exception as ex:
            p._fatal_error(ex, "Fatal error on SSL protocol")
            return
        data = p._outgoing.read()
        if data:
            p._transport.write(data)
        if p._app_writing_paused:  # nothing is buffered now: let asyncio resume the app
            p._control_app_writing()


TLS_READ_BUFFER = 256 * 1024
# What the fast path reads and calls of asyncio's SSLProtocol (Python 3.11's; checked once on
# the first connection, and asyncio's own path taken throughout where any is missing).
_ASYNCIO_INTERNALS = (
    "_state", "_app_reading_paused", "_app_writing_paused", "_app_protocol_is_buffer",
    "_sslobj", "_incoming", "_outgoing", "_write_backlog", "_write_buffer_size",
    "_outgoing_high_water", "_incoming_high_water", "_ssl_reading_paused",
    "_ssl_writing_paused", "_transport", "_app_protocol", "_do_write", "_process_outgoing",
    "_control_app_writing", "_control_ssl_reading", "_call_eof_received", "_start_shutdown",
    "_fatal_error",
)  # fmt: skip
_WRAPPED = sslproto.SSLProtocolState.WRAPPED
_AGAIN = (ssl.SSLWantReadError, ssl.SSLSyscallError)  # asyncio's SSLAgainErrors


async def start_tls_server(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    ctx: ssl.SSLContext,
    *,
    host: str | None = None,
    port: int = 0,
    sock: socket.socket | None = None,
    handshake_timeout: float | None = None,
    reuse_address: bool | None = None,
) -> asyncio.Server:
    """`loop.create_server(..., ssl=ctx)`, with the TLS layer from `_TlsProtocol`."""
    loop = asyncio.get_running_loop()

    # No waiter for a server's connections (asyncio's stubs say one is required; asyncio
    # itself accepts None, and a waiter nobody awaits would log every failed handshake).
    no_waiter: Any = None
    timeout: Any = handshake_timeout  # the stubs say int; asyncio takes any number

    def tls() -> _TlsProtocol:
        return _TlsProtocol(loop, protocol_factory(), ctx, no_waiter, server_side=True,
                            ssl_handshake_timeout=timeout)  # fmt: skip

    if sock is not None:
        return await loop.create_server(tls, sock=sock)
    return await loop.create_server(tls, host, port, reuse_address=reuse_address)


async def open_tls_connection(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    host: str,
    port: int,
    ctx: ssl.SSLContext,
    *,
    server_hostname: str,
    handshake_timeout: float | None = None,
) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
    """`loop.create_connection(..., ssl=ctx)`, with the TLS layer from `_TlsProtocol`;
    returns once the handshake is done (the protocol has seen `connection_made`)."""
    loop = asyncio.get_running_loop()
    app = protocol_factory()
    done: asyncio.Future[None] = loop.create_future()
    timeout: Any = handshake_timeout  # the stubs say int; asyncio takes any number
    tls = _TlsProtocol(loop, app, ctx, done, server_side=False, server_hostname=server_hostname,
                       ssl_handshake_timeout=timeout)  # fmt: skip
    raw, _ = await loop.create_connection(lambda: tls, host, port)
    try:
        await done
    except BaseException:
        raw.close()
        raise
    return tls._app_transport, app
