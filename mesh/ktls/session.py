"""Socket glue: run the handshake over a real socket one record at a time, then hand the record
layer to the kernel."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from dataclasses import dataclass, field

from OpenSSL import SSL

from mesh.ktls.abi import CIPHERS, SOL_TLS, TCP_ULP, TLS_RX, TLS_RX_EXPECT_NO_PAD, TLS_TX
from mesh.ktls.errors import KtlsError
from mesh.ktls.handshake import Handshake, KtlsContext
from mesh.ktls.keys import TrafficKeys
from mesh.ktls.records import MAX_RECORD, RECORD_HEADER

log = logging.getLogger("mesh.ktls")

# -- socket glue ---------------------------------------------------------------------------


def install(sock: socket.socket, keys: TrafficKeys) -> bool:
    """Hand the record layer to the kernel; the socket carries plaintext from now on.

    False when the ULP would not attach, before anything changed: TCP must still be
    ESTABLISHED, so a peer that already sent FIN (it wrote and half-closed right after its
    Finished) leaves the socket in CLOSE_WAIT and this connection stays in user space.
    A failure after the ULP attached cannot be undone and is an error."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return False
        raise KtlsError(f"attaching the TLS ULP failed: {exc}") from None
    try:
        tx, rx = keys.tx, keys.rx
        sock.setsockopt(SOL_TLS, TLS_TX, keys.spec.crypto_info(tx.key, tx.iv, tx.seq))
        sock.setsockopt(SOL_TLS, TLS_RX, keys.spec.crypto_info(rx.key, rx.iv, rx.seq))
    except OSError as exc:
        raise KtlsError(f"installing {keys.spec.suite} keys in the kernel failed: {exc}") from None
    # Lets the kernel decrypt TLS 1.3 records in place (6.0+); an optimisation only.
    with contextlib.suppress(OSError):
        sock.setsockopt(SOL_TLS, TLS_RX_EXPECT_NO_PAD, 1)
    return True


async def _read_record(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """Exactly one TLS record from the socket, never a byte more (see `Handshake`)."""
    header = await _read_exactly(loop, sock, RECORD_HEADER)
    length = int.from_bytes(header[3:5], "big")
    if length > MAX_RECORD:
        raise KtlsError(f"TLS record of {length} bytes exceeds the protocol limit")
    return header + await _read_exactly(loop, sock, length)


async def _read_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = await loop.sock_recv_into(sock, view[got:])
        if k == 0:
            raise KtlsError("peer closed the connection during the TLS handshake")
        got += k
    return bytes(buf)


@dataclass(frozen=True)
class KtlsSession:
    """What the handshake established. Quacks like the parts of `ssl.SSLObject` the HBONE
    code reads, so the same peer checks run whichever TLS implementation carried them."""

    cipher_suite: str
    alpn: str | None
    peer_der: bytes | None
    tx_seq: int
    rx_seq: int
    # Set when the keys could not go to the kernel: the record layer stays in OpenSSL.
    user_space: SSL.Connection | None = field(default=None, compare=False, repr=False)

    @property
    def offloaded(self) -> bool:
        return self.user_space is None

    def selected_alpn_protocol(self) -> str | None:
        return self.alpn

    def getpeercert(self, binary_form: bool = False) -> bytes | None:
        if not binary_form:
            raise ValueError("kTLS sessions expose the peer certificate in DER form only")
        return self.peer_der

    def version(self) -> str:
        return "TLSv1.3"

    def cipher(self) -> tuple[str, str, int]:
        return (self.cipher_suite, "TLSv1.3", CIPHERS[self.cipher_suite].key_size * 8)


async def handshake(
    sock: socket.socket, ctx: KtlsContext, *, offload: bool = True
) -> tuple[KtlsSession, Handshake]:
    """Run the TLS 1.3 handshake on a connected non-blocking socket and, with `offload`,
    install the keys; without (or when the kernel would not take them) the session carries
    the OpenSSL connection for a user-space record layer. The caller bounds it with a timeout
    and closes `sock` on error."""
    loop = asyncio.get_running_loop()
    hs = Handshake(ctx)
    record: bytes | None = None
    while True:
        try:
            out = hs.step(record)
        except KtlsError:
            with contextlib.suppress(OSError):
                alert = hs.alert()
                if alert:
                    await loop.sock_sendall(sock, alert)
            raise
        if out:
            await loop.sock_sendall(sock, out)
        if hs.done:
            break
        record = await _read_record(loop, sock)
    keys = hs.keys()
    in_kernel = install(sock, keys) if offload else False
    session = KtlsSession(
        keys.spec.suite,
        hs.alpn(),
        hs.peer_der(),
        keys.tx.seq,
        keys.rx.seq,
        None if in_kernel else hs.conn,
    )
    if offload and not in_kernel:
        log.debug("ktls: peer half-closed during the handshake; this one stays in user space")
    return session, hs


async def client_handshake(sock: socket.socket, ctx: KtlsContext) -> KtlsSession:
    if ctx.server_side:
        raise ValueError("client_handshake needs a client context")
    return (await handshake(sock, ctx))[0]


async def server_handshake(sock: socket.socket, ctx: KtlsContext) -> KtlsSession:
    if not ctx.server_side:
        raise ValueError("server_handshake needs a server context")
    return (await handshake(sock, ctx))[0]
