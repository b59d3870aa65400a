"""The transport machinery on any kernel, with OpenSSL as the record layer (the path a
connection takes when its keys cannot go to the kernel): buffering, back-pressure,
close_notify, half-close, refused peers. tests/ktls runs the kernel record layer."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from certs.ca import CertificateAuthority
from mesh import ktls
from mesh import tls as mtls
from tests.ktls.helpers import Echo, Recorder

SERVER = "spiffe://cluster.local/ns/shop/sa/web"
CLIENT = "spiffe://cluster.local/ns/shop/sa/frontend"


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca")


async def user_space_pair(
    ca: CertificateAuthority, server_proto: type[Recorder] = Echo
) -> tuple[ktls.KtlsTransport, Recorder, ktls.KtlsTransport, Recorder]:
    srv = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(srv.getsockname())
    s, _ = srv.accept()
    srv.close()
    c.setblocking(False)
    s.setblocking(False)
    cctx = ktls.client_context(ca.issue(CLIENT), ca.bundle_pem)
    sctx = ktls.server_context(ca.issue(SERVER), ca.bundle_pem)
    (cs, _), (ss, _) = await asyncio.wait_for(
        asyncio.gather(
            ktls.handshake(c, cctx, offload=False), ktls.handshake(s, sctx, offload=False)
        ),
        10,
    )
    assert not cs.offloaded and not ss.offloaded
    loop = asyncio.get_running_loop()
    sp = server_proto()
    st = ktls.transport_for(loop, s, sp, ss)
    cp = Recorder()
    ct = ktls.transport_for(loop, c, cp, cs)
    return ct, cp, st, sp


async def test_echo_and_close_notify(ca: CertificateAuthority) -> None:
    ct, cp, _st, sp = await user_space_pair(ca)
    assert isinstance(ct, ktls.UserTlsTransport)
    assert ct.get_extra_info("ktls") is False
    assert mtls.check_peer(ct.get_extra_info("ssl_object"), {SERVER}, "cluster.local") == SERVER
    payload = os.urandom(5 << 20)
    ct.write(payload)
    ct.write_eof()  # close_notify; the echo answers everything, then closes
    await asyncio.wait_for(cp.eof, 30)
    assert bytes(cp.data) == payload
    assert await asyncio.wait_for(cp.lost, 5) is None
    assert await asyncio.wait_for(sp.lost, 5) is None


async def test_write_back_pressure_pauses_and_resumes(ca: CertificateAuthority) -> None:
    class Slow(Recorder):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            assert isinstance(transport, asyncio.Transport)
            transport.pause_reading()

    ct, cp, st, sp = await user_space_pair(ca, server_proto=Slow)
    events: list[str] = []
    cp.pause_writing = lambda: events.append("pause")  # type: ignore[method-assign]
    cp.resume_writing = lambda: events.append("resume")  # type: ignore[method-assign]
    chunk = os.urandom(1 << 20)
    for _ in range(16):
        ct.write(chunk)
    assert events == ["pause"] and ct.get_write_buffer_size() > 0
    st.resume_reading()
    await asyncio.wait_for(sp.until(16 << 20), 30)
    assert events == ["pause", "resume"] and ct.get_write_buffer_size() == 0
    ct.close()
    await asyncio.wait_for(sp.eof, 5)


async def test_abort_skips_close_notify(ca: CertificateAuthority) -> None:
    ct, cp, _st, sp = await user_space_pair(ca, server_proto=Recorder)
    ct.abort()
    assert ct.is_closing()
    assert await asyncio.wait_for(cp.lost, 5) is None
    # The peer's connection ends too (FIN or RST, whichever TCP chose); not as a clean EOF.
    await asyncio.wait_for(sp.lost, 5)
    assert sp.eof.done() and sp.eof.exception() is not None


async def test_garbage_on_the_wire_fails_the_connection(ca: CertificateAuthority) -> None:
    ct, _cp, _st, sp = await user_space_pair(ca, server_proto=Recorder)
    ct.write(b"good")
    await asyncio.wait_for(sp.until(4), 5)
    raw = ct.get_extra_info("socket")
    raw.send(b"\x17\x03\x03\x00\x20" + os.urandom(32))
    exc = await asyncio.wait_for(sp.lost, 5)
    assert isinstance(exc, ktls.KtlsError) and "record refused" in str(exc)
    assert bytes(sp.data) == b"good"


async def test_install_fails_cleanly_on_a_kernel_without_tls(ca: CertificateAuthority) -> None:
    if ktls.probe().available:
        pytest.skip("this kernel has kTLS")
    srv = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(srv.getsockname())
    s, _ = srv.accept()
    srv.close()
    c.setblocking(False)
    s.setblocking(False)
    cctx = ktls.client_context(ca.issue(CLIENT), ca.bundle_pem)
    sctx = ktls.server_context(ca.issue(SERVER), ca.bundle_pem)
    try:
        results = await asyncio.wait_for(
            asyncio.gather(
                ktls.handshake(c, cctx), ktls.handshake(s, sctx), return_exceptions=True
            ),
            10,
        )
        assert isinstance(results[0], ktls.KtlsError)
        assert "attaching the TLS ULP failed" in str(results[0])
    finally:
        c.close()
        s.close()
