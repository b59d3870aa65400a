"""The user-space half of kTLS on any kernel: the pyOpenSSL handshake, the keys and sequence
numbers we would install, and how post-handshake records are interpreted.

The kernel's record layer is replaced by a software one (ktls_records): if the keys or the
sequence numbers were wrong, its AEAD would refuse the peer's real records."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from certs.ca import CertificateAuthority
from mesh import ktls
from mesh import tls as mtls
from tests.unit.mesh.ktls_records import open_record, recv_records, seal, split_records

SERVER = "spiffe://cluster.local/ns/shop/sa/web"
CLIENT = "spiffe://cluster.local/ns/shop/sa/frontend"


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca")


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    srv = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(srv.getsockname())
    s, _ = srv.accept()
    srv.close()
    for x in (c, s):
        x.setblocking(False)
    yield c, s
    c.close()
    s.close()


async def both(
    c: socket.socket, s: socket.socket, cctx: ktls.KtlsContext, sctx: ktls.KtlsContext
) -> tuple[tuple[ktls.KtlsSession, ktls.Handshake], tuple[ktls.KtlsSession, ktls.Handshake]]:
    async with asyncio.timeout(10):
        return await asyncio.gather(
            ktls.handshake(c, cctx, offload=False), ktls.handshake(s, sctx, offload=False)
        )


@pytest.mark.parametrize("suite", list(ktls.CIPHERS))
async def test_keys_and_sequence_numbers_read_the_peers_real_records(
    ca: CertificateAuthority, pair: tuple[socket.socket, socket.socket], suite: str
) -> None:
    c, s = pair
    cctx = ktls.client_context(ca.issue(CLIENT), ca.bundle_pem, ciphers=[suite])
    sctx = ktls.server_context(ca.issue(SERVER), ca.bundle_pem)
    (csess, chs), (ssess, shs) = await both(c, s, cctx, sctx)
    ckeys, skeys = chs.keys(), shs.keys()
    assert csess.cipher_suite == ssess.cipher_suite == suite
    assert csess.selected_alpn_protocol() == ssess.selected_alpn_protocol() == "h2"
    assert mtls.peer_identity(csess) == SERVER  # type: ignore[arg-type]
    assert mtls.peer_identity(ssess) == CLIENT  # type: ignore[arg-type]
    # Same keys seen from both sides; OpenSSL's server sent its tickets under its TX key.
    assert (ckeys.tx.key, ckeys.tx.iv) == (skeys.rx.key, skeys.rx.iv)
    assert (ckeys.rx.key, ckeys.rx.iv) == (skeys.tx.key, skeys.tx.iv)
    tickets = skeys.tx.seq
    assert tickets >= 1 and ckeys.rx.seq == 0 and ckeys.tx.seq == 0 and skeys.rx.seq == 0
    spec = ckeys.spec

    c.setblocking(True)
    s.setblocking(True)
    # Server side, as its kernel would after offload: the next record is number `tickets`.
    s.sendall(seal(spec, skeys.tx, tickets, 23, b"hello from the server"))
    # Client side, as its kernel would: the tickets are still in the socket, from record 0.
    recs = recv_records(c, tickets + 1)
    types = [open_record(spec, ckeys.rx, i, r) for i, r in enumerate(recs)]
    assert [t for t, _ in types[:tickets]] == [22] * tickets
    assert all(p[0] == 4 for _, p in types[:tickets])  # NewSessionTicket
    assert ktls.interpret(22, types[0][1]) is ktls.RecordAction.SKIP
    assert types[-1] == (23, b"hello from the server")
    # Client to server: record 0 of the client's direction.
    c.sendall(seal(spec, ckeys.tx, 0, 23, b"hello from the client"))
    assert open_record(spec, skeys.rx, 0, recv_records(s, 1)[0]) == (23, b"hello from the client")
    # OpenSSL agrees with our count: its own next record (it does not know of the one we
    # sealed above) is number `tickets`.
    shs.conn.send(b"openssl")
    rec = split_records(shs.conn.bio_read(65536))[0]
    assert open_record(spec, ckeys.rx, tickets, rec) == (23, b"openssl")


async def test_a_peer_without_tickets_starts_at_zero(
    ca: CertificateAuthority,
) -> None:
    """A stdlib server (num_tickets = 0, as mesh.tls builds it) against our client."""
    sctx = mtls.server_context(ca.issue(SERVER), ca.bundle_pem)

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"no tickets here")
        await w.drain()
        await r.read()
        w.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=sctx)
    port = server.sockets[0].getsockname()[1]
    c = socket.create_connection(("127.0.0.1", port))
    c.setblocking(False)
    try:
        cctx = ktls.client_context(ca.issue(CLIENT), ca.bundle_pem)
        async with asyncio.timeout(10):
            sess, hs = await ktls.handshake(c, cctx, offload=False)
        keys = hs.keys()
        assert mtls.peer_identity(sess) == SERVER  # type: ignore[arg-type]
        c.setblocking(True)
        rec = await asyncio.to_thread(recv_records, c, 1)
        assert open_record(keys.spec, keys.rx, 0, rec[0]) == (23, b"no tickets here")
    finally:
        c.close()
        server.close()
        await server.wait_closed()


async def test_stdlib_client_reads_what_our_offloaded_server_would_send(
    ca: CertificateAuthority,
) -> None:
    """Our server's TX sequence number, checked by an independent TLS stack."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.setblocking(False)
    loop = asyncio.get_running_loop()
    cctx = mtls.client_context(ca.issue(CLIENT), ca.bundle_pem)
    sctx = ktls.server_context(ca.issue(SERVER), ca.bundle_pem)

    async def serve() -> tuple[socket.socket, ktls.Handshake]:
        conn, _ = await loop.sock_accept(srv)
        conn.setblocking(False)
        _, hs = await ktls.handshake(conn, sctx, offload=False)
        return conn, hs

    server_task = asyncio.create_task(serve())
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", srv.getsockname()[1], ssl=cctx, server_hostname="x"
    )
    conn, hs = await server_task
    try:
        ssl_obj = writer.get_extra_info("ssl_object")
        assert isinstance(ssl_obj, ssl.SSLObject)
        assert mtls.check_peer(ssl_obj, {SERVER}, "cluster.local") == SERVER
        keys = hs.keys()
        data = seal(keys.spec, keys.tx, keys.tx.seq, 23, b"kernel would send this")
        await loop.sock_sendall(conn, data)
        assert await reader.readexactly(22) == b"kernel would send this"
        # close_notify as the transport sends it after offload: the stdlib sees a clean EOF.
        await loop.sock_sendall(conn, seal(keys.spec, keys.tx, keys.tx.seq + 1, 21, b"\x01\x00"))
        assert await reader.read() == b""
    finally:
        writer.close()
        conn.close()
        srv.close()


async def test_untrusted_peer_fails_the_handshake_on_both_sides(
    tmp_path: Path, ca: CertificateAuthority, pair: tuple[socket.socket, socket.socket]
) -> None:
    other = CertificateAuthority.init(tmp_path / "other")
    c, s = pair
    cctx = ktls.client_context(ca.issue(CLIENT), ca.bundle_pem)
    sctx = ktls.server_context(other.issue(SERVER), other.bundle_pem)
    results = await asyncio.wait_for(
        asyncio.gather(
            ktls.handshake(c, cctx, offload=False),
            ktls.handshake(s, sctx, offload=False),
            return_exceptions=True,
        ),
        10,
    )
    assert isinstance(results[0], ktls.KtlsError)
    assert "certificate verify failed" in str(results[0])
    assert isinstance(results[1], ktls.KtlsError)


def test_ciphers_must_be_kernel_ciphers(ca: CertificateAuthority) -> None:
    with pytest.raises(ValueError, match=r"ktls ciphers: \['TLS_AES_128_CCM_SHA256'\]"):
        ktls.client_context(ca.issue(CLIENT), ca.bundle_pem, ciphers=["TLS_AES_128_CCM_SHA256"])


def test_traffic_keys_rfc8448_vector() -> None:
    """RFC 8448 §3 (simple 1-RTT): server application traffic secret -> key and iv."""
    secret = bytes.fromhex("a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643")
    key, iv = ktls.traffic_keys(ktls.AES_128_GCM, secret)
    assert key.hex() == "9f02283b6c9c07efc26bb9f2ac92e356"
    assert iv.hex() == "cf782b88dd83549aadf1e984"


@pytest.mark.parametrize(
    ("rtype", "payload", "expected"),
    [
        (23, b"abc", ktls.RecordAction.DATA),
        (22, b"\x04\x00\x00\x02ab", ktls.RecordAction.SKIP),
        (22, b"\x04\x00\x00\x01a\x04\x00\x00\x00", ktls.RecordAction.SKIP),
        (21, b"\x01\x00", ktls.RecordAction.EOF),
    ],
)
def test_interpret_records(rtype: int, payload: bytes, expected: ktls.RecordAction) -> None:
    assert ktls.interpret(rtype, payload) is expected


@pytest.mark.parametrize(
    ("rtype", "payload", "message"),
    [
        (22, b"\x18\x00\x00\x01\x00", "KeyUpdate"),
        (22, b"\x04\x00\x00\x01a\x18\x00\x00\x01\x01", "KeyUpdate"),
        (22, b"\x0d\x00\x00\x00", "unexpected post-handshake message type 13"),
        (22, b"\x04\x00", "truncated"),
        (21, b"\x02\x14", "alert 20"),
        (21, b"\x01", "malformed alert"),
        (20, b"\x01", "unexpected TLS record type 20"),
    ],
)
def test_interpret_refuses(rtype: int, payload: bytes, message: str) -> None:
    with pytest.raises(ktls.KtlsError, match=message):
        ktls.interpret(rtype, payload)


def test_count_records() -> None:
    assert ktls.count_records(b"") == 0
    assert ktls.count_records(b"\x17\x03\x03\x00\x01x\x17\x03\x03\x00\x00") == 2
    with pytest.raises(ktls.KtlsError):
        ktls.count_records(b"\x17\x03\x03\x00\x05xx")
