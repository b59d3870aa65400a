"""The same offload under asyncio's own event loop (the rest of tests/ktls use uvloop)."""

from __future__ import annotations

import asyncio
import os

from certs.ca import CertificateAuthority
from mesh import ktls
from tests.ktls.helpers import Echo, Recorder


async def test_echo_on_the_default_loop(ca: CertificateAuthority) -> None:
    assert not type(asyncio.get_running_loop()).__module__.startswith("uvloop")
    sctx = ktls.server_context(ca.issue("spiffe://cluster.local/ns/a/sa/s"), ca.bundle_pem)
    server = await ktls.start_server(Echo, "127.0.0.1", 0, sctx)
    try:
        cctx = ktls.client_context(ca.issue("spiffe://cluster.local/ns/a/sa/c"), ca.bundle_pem)
        transport, proto = await ktls.create_connection(
            Recorder, server.sockets[0].getsockname()[:2], cctx
        )
        assert isinstance(proto, Recorder)
        payload = os.urandom(2 << 20)
        transport.write(payload)
        transport.write_eof()
        await asyncio.wait_for(proto.eof, 30)
        assert bytes(proto.data) == payload
    finally:
        server.close()
        await server.wait_closed()
