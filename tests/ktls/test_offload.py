"""kTLS on both ends of real TCP connections, in a kernel with kTLS (see conftest.py).

Each test makes a real TLS 1.3 handshake in user space, installs the keys in the kernel and
moves bytes through the kernel's record layer; the peer is either our own offloaded end or an
independent TLS stack (the stdlib's user-space ssl)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator

import pytest

from certs.ca import CertificateAuthority
from mesh import ktls
from mesh import tls as mtls
from tests.ktls.helpers import CorruptingRelay, Echo, Recorder

SERVER = "spiffe://cluster.local/ns/shop/sa/web"
CLIENT = "spiffe://cluster.local/ns/shop/sa/frontend"


def test_probe_sees_every_cipher() -> None:
    support = ktls.probe()
    assert support.available
    assert set(support.ciphers) == set(ktls.CIPHERS)
    assert ktls.resolve("on") is True


async def start(
    ca: CertificateAuthority, proto: type[Recorder] = Echo, suites: list[str] | None = None
) -> tuple[ktls.KtlsServer, Made, ktls.KtlsContext]:
    made = Made()

    def factory() -> Recorder:
        p = proto()
        made.append(p)
        return p

    sctx = ktls.server_context(ca.issue(SERVER), ca.bundle_pem)
    server = await ktls.start_server(factory, "127.0.0.1", 0, sctx)
    cctx = ktls.client_context(ca.issue(CLIENT), ca.bundle_pem, ciphers=suites)
    return server, made, cctx


class Made(list[Recorder]):
    """The server's protocols, in accept order, with an event for the first."""

    def __init__(self) -> None:
        super().__init__()
        self.first = asyncio.Event()

    def append(self, p: Recorder) -> None:
        super().append(p)
        self.first.set()


async def server_side(made: Made, n: int) -> None:
    """The server's first protocol, once it exists and has `n` bytes."""
    await made.first.wait()
    await made[0].until(n)


def port(server: ktls.KtlsServer) -> tuple[str, int]:
    host, p = server.sockets[0].getsockname()[:2]
    return host, p


@pytest.fixture
async def servers() -> AsyncIterator[list[ktls.KtlsServer]]:
    made: list[ktls.KtlsServer] = []
    yield made
    for s in made:
        s.close()
        await s.wait_closed()


@pytest.mark.parametrize("suite", list(ktls.CIPHERS))
async def test_each_cipher_both_ends_offloaded(
    ca: CertificateAuthority, servers: list[ktls.KtlsServer], suite: str
) -> None:
    server, made, cctx = await start(ca, suites=[suite])
    servers.append(server)
    transport, proto = await ktls.create_connection(Recorder, port(server), cctx)
    assert isinstance(proto, Recorder)
    sock = transport.get_extra_info("socket")
    # The kernel holds the record layer: the ULP is attached and the cipher is installed.
    assert sock.getsockopt(socket.IPPROTO_TCP, ktls.TCP_ULP, 16).rstrip(b"\0") == b"tls"
    assert transport.get_extra_info("cipher")[0] == suite
    session = transport.get_extra_info("ssl_object")
    assert mtls.check_peer(session, {SERVER}, "cluster.local") == SERVER
    payload = os.urandom(3 * 1024 * 1024 + 17)
    transport.write(payload)
    await asyncio.wait_for(proto.until(len(payload)), 60)
    assert bytes(proto.data) == payload
    srv_side = made[0]
    srv_session = srv_side.transport.get_extra_info("ssl_object")  # type: ignore[union-attr]
    assert mtls.check_peer(srv_session, {CLIENT}, "cluster.local") == CLIENT
    # Our server sent session tickets (pyOpenSSL cannot turn them off): its TX sequence
    # number started past them, and the client skipped them as handshake records.
    assert srv_session.tx_seq >= 1 and session.rx_seq == 0
    transport.close()
    assert await asyncio.wait_for(proto.lost, 10) is None
    await asyncio.wait_for(srv_side.lost, 10)


async def test_large_transfer_with_checksum(
    ca: CertificateAuthority, servers: list[ktls.KtlsServer]
) -> None:
    """64 MiB each way through the kernel's record layer, back-pressure included."""
    size = 64 * 1024 * 1024
    server, made, cctx = await start(ca)
    servers.append(server)
    transport, proto = await ktls.create_connection(Recorder, port(server), cctx)
    assert isinstance(proto, Recorder)
    proto.keep = False
    chunk = os.urandom(1 << 20)
    sent = hashlib.sha256()
    can_write = asyncio.Event()
    can_write.set()
    proto.pause_writing = can_write.clear  # type: ignore[method-assign]
    proto.resume_writing = can_write.set  # type: ignore[method-assign]
    async with asyncio.timeout(240):
        for i in range(size // len(chunk)):
            block = bytes([i & 0xFF]) + chunk[1:]
            sent.update(block)
            await can_write.wait()
            transport.write(block)
        transport.write_eof()
        await proto.eof  # the echo server closes after echoing everything: close_notify
    made[0].keep = False
    assert proto.received == size
    assert proto.digest.hexdigest() == sent.hexdigest()
    assert await asyncio.wait_for(proto.lost, 10) is None


async def test_close_notify_is_a_clean_eof_and_half_close_works(
    ca: CertificateAuthority, servers: list[ktls.KtlsServer]
) -> None:
    class Sink(Recorder):
        def eof_received(self) -> bool:
            super().eof_received()
            assert self.transport is not None
            self.transport.write(b"got %d" % len(self.data))  # still writable: half-close
            self.transport.close()
            return True

    server, made, cctx = await start(ca, proto=Sink)
    servers.append(server)
    transport, proto = await ktls.create_connection(Recorder, port(server), cctx)
    assert isinstance(proto, Recorder)
    proto.keep_open_on_eof = True
    transport.write(b"x" * 1000)
    transport.write_eof()  # close_notify: our direction ends, theirs does not
    await asyncio.wait_for(proto.eof, 10)
    assert bytes(proto.data) == b"got 1000"
    assert await asyncio.wait_for(made[0].lost, 10) is None
    transport.close()
    assert await asyncio.wait_for(proto.lost, 10) is None


async def test_corrupted_record_fails_and_delivers_nothing_wrong(
    ca: CertificateAuthority, servers: list[ktls.KtlsServer]
) -> None:
    class Sender(Recorder):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            assert isinstance(transport, asyncio.Transport)
            transport.write(PAYLOAD)

    server, _, cctx = await start(ca, proto=Sender)
    servers.append(server)
    relay = CorruptingRelay(port(server), offset=200_000)
    relay_port = await relay.start()
    try:
        transport, proto = await ktls.create_connection(Recorder, ("127.0.0.1", relay_port), cctx)
        assert isinstance(proto, Recorder)
        exc = await asyncio.wait_for(proto.lost, 20)
    finally:
        await relay.close()
    assert relay.flipped
    assert isinstance(exc, ktls.KtlsError)
    assert "failed authentication" in str(exc)
    # Everything delivered is a true prefix, and it stops before the damaged record.
    assert 0 < len(proto.data) < 200_000
    assert bytes(proto.data) == PAYLOAD[: len(proto.data)]
    assert transport.is_closing()


PAYLOAD = os.urandom(1 << 20)


async def test_key_update_is_refused_not_misread(
    ca: CertificateAuthority, servers: list[ktls.KtlsServer]
) -> None:
    """The peer rekeys (a KeyUpdate handshake record, sent here through the server's own
    kernel TX): the client fails the connection with the reason instead of reading records
    under keys it does not have."""
    server, made, cctx = await start(ca, proto=Recorder)
    servers.append(server)
    transport, proto = await ktls.create_connection(Recorder, port(server), cctx)
    assert isinstance(proto, Recorder)
    transport.write(b"hi")
    await asyncio.wait_for(server_side(made, 2), 10)
    srv = made[0].transport
    assert srv is not None
    srv.write(b"before")
    sock = srv.get_extra_info("socket")
    key_update = bytes([ktls.HANDSHAKE_KEY_UPDATE, 0, 0, 1, 0])
    sock.sendmsg(
        [key_update], [(ktls.SOL_TLS, ktls.TLS_SET_RECORD_TYPE, bytes([ktls.RECORD_HANDSHAKE]))]
    )
    exc = await asyncio.wait_for(proto.lost, 10)
    assert isinstance(exc, ktls.KtlsError) and "KeyUpdate" in str(exc)
    assert bytes(proto.data) == b"before"


async def test_fatal_alert_from_peer_is_an_error(
    ca: CertificateAuthority, servers: list[ktls.KtlsServer]
) -> None:
    server, made, cctx = await start(ca, proto=Recorder)
    servers.append(server)
    transport, proto = await ktls.create_connection(Recorder, port(server), cctx)
    assert isinstance(proto, Recorder)
    transport.write(b"hi")
    await asyncio.wait_for(server_side(made, 2), 10)
    sock = made[0].transport.get_extra_info("socket")  # type: ignore[union-attr]
    sock.sendmsg([b"\x02\x28"], [(ktls.SOL_TLS, ktls.TLS_SET_RECORD_TYPE, b"\x15")])
    exc = await asyncio.wait_for(proto.lost, 10)
    assert isinstance(exc, ktls.KtlsError) and "alert 40" in str(exc)


@pytest.mark.parametrize("num_tickets", [0, 2])
async def test_stdlib_server_peer_with_and_without_tickets(
    ca: CertificateAuthority, num_tickets: int
) -> None:
    """An independent user-space TLS stack as the server: tickets or none, our offloaded
    client reads its records and its close_notify."""
    sctx = mtls.server_context(ca.issue(SERVER), ca.bundle_pem)
    sctx.num_tickets = num_tickets

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.readexactly(5)
        w.write(data.upper() * 1000)
        await w.drain()
        w.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=sctx)
    try:
        cctx = ktls.client_context(ca.issue(CLIENT), ca.bundle_pem)
        transport, proto = await ktls.create_connection(
            Recorder, server.sockets[0].getsockname()[:2], cctx
        )
        assert isinstance(proto, Recorder)
        transport.write(b"hello")
        await asyncio.wait_for(proto.eof, 10)
        assert bytes(proto.data) == b"HELLO" * 1000
        assert await asyncio.wait_for(proto.lost, 10) is None
    finally:
        server.close()
        await server.wait_closed()


async def test_stdlib_client_peer(ca: CertificateAuthority, servers: list[ktls.KtlsServer]) -> None:
    server, _, _ = await start(ca)
    servers.append(server)
    cctx = mtls.client_context(ca.issue(CLIENT), ca.bundle_pem)
    r, w = await asyncio.open_connection(*port(server), ssl=cctx, server_hostname="x")
    assert mtls.check_peer(w.get_extra_info("ssl_object"), {SERVER}, "cluster.local") == SERVER
    payload = os.urandom(1 << 20)
    w.write(payload)
    w.write(b"")
    got = await asyncio.wait_for(r.readexactly(len(payload)), 30)
    assert got == payload
    w.close()


async def test_untrusted_client_is_refused_and_server_keeps_serving(
    tmp_path: object, ca: CertificateAuthority, servers: list[ktls.KtlsServer]
) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    server, _, cctx = await start(ca)
    servers.append(server)
    other = CertificateAuthority.init(tmp_path / "other")
    bad = ktls.client_context(other.issue(CLIENT), other.bundle_pem)
    with pytest.raises(ktls.KtlsError, match="certificate verify failed"):
        await ktls.create_connection(Recorder, port(server), bad)
    transport, proto = await ktls.create_connection(Recorder, port(server), cctx)
    transport.write(b"still here")
    assert isinstance(proto, Recorder)
    await asyncio.wait_for(proto.until(10), 10)
    assert server.handshake_failures == 1
    transport.close()


async def test_kernel_end_against_openssl_end(ca: CertificateAuthority) -> None:
    """One end offloaded, the other with OpenSSL's record layer over the same handshake code:
    each must read the other's records, tickets and close_notify included."""
    srv = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(srv.getsockname())
    s, _ = srv.accept()
    srv.close()
    c.setblocking(False)
    s.setblocking(False)
    cctx = ktls.client_context(ca.issue(CLIENT), ca.bundle_pem)
    sctx = ktls.server_context(ca.issue(SERVER), ca.bundle_pem)
    (cs, _), (ss, _) = await asyncio.wait_for(
        asyncio.gather(ktls.handshake(c, cctx), ktls.handshake(s, sctx, offload=False)), 10
    )
    assert cs.offloaded and not ss.offloaded
    loop = asyncio.get_running_loop()
    sp = Echo()
    ktls.transport_for(loop, s, sp, ss)
    cp = Recorder()
    ct = ktls.transport_for(loop, c, cp, cs)
    payload = os.urandom(4 << 20)
    ct.write(payload)
    ct.write_eof()
    await asyncio.wait_for(cp.eof, 60)
    assert bytes(cp.data) == payload
    assert await asyncio.wait_for(cp.lost, 10) is None
