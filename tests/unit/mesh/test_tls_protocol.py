"""mesh.tls's TLS protocol (asyncio's, with a fast path for established connections) over real
loopback sockets and real TLS 1.3: every byte arrives, in order, in both directions, whatever
the write sizes and however records split across reads; a close still reaches the peer as
end of stream; and established traffic really takes the fast path."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from asyncio import sslproto
from pathlib import Path
from typing import Any, cast

import pytest

import mesh.tls
from certs.ca import CertificateAuthority
from mesh.tls import client_context, open_tls_connection, server_context, start_tls_server

SERVER = "spiffe://cluster.local/ns/shop/sa/web"
CLIENT = "spiffe://cluster.local/ns/shop/sa/frontend"


class Echo(asyncio.Protocol):
    """Echoes everything; answers end of stream by closing (TLS close_notify)."""

    def __init__(self) -> None:
        self.eof = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def eof_received(self) -> bool:
        if not self.eof.done():
            self.eof.set_result(None)
        return False


class Collect(asyncio.Protocol):
    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.n = 0
        self.target = 0
        self.got_all = asyncio.get_running_loop().create_future()
        self.lost = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.h.update(data)
        self.n += len(data)
        if self.n >= self.target and not self.got_all.done():
            self.got_all.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "asyncio-internals-differ"])
async def test_every_byte_both_ways_in_order_then_the_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    """Also with the fast path off, as on a Python whose asyncio lacks what it reads: then
    asyncio's own path carries every byte."""
    if not fast:
        monkeypatch.setattr(mesh.tls._TlsProtocol, "_fast", False)
    slow_reads = 0
    orig_do_read = sslproto.SSLProtocol._do_read  # type: ignore[attr-defined]

    def counting_do_read(self: Any) -> None:
        nonlocal slow_reads
        slow_reads += 1
        orig_do_read(self)

    monkeypatch.setattr(sslproto.SSLProtocol, "_do_read", counting_do_read)
    ca = CertificateAuthority.init(tmp_path / "ca")
    echoes: list[Echo] = []

    def echo() -> Echo:
        e = Echo()
        echoes.append(e)
        return e

    server = await start_tls_server(
        echo, server_context(ca.issue(SERVER), ca.bundle_pem), host="127.0.0.1", port=0
    )
    port = server.sockets[0].getsockname()[1]
    try:
        transport, proto = await open_tls_connection(
            Collect, "127.0.0.1", port, client_context(ca.issue(CLIENT), ca.bundle_pem),
            server_hostname="web",
        )  # fmt: skip
        collect = cast(Collect, proto)
        rng = random.Random(15)
        sent = hashlib.sha256()
        total = 0
        # Small writes (a record each), sizes around a record's, and large ones that the
        # socket splits: records then arrive cut across reads and several to a read.
        sizes = [rng.randint(1, 300) for _ in range(2000)] + [16384, 16385, 40000, 3 << 20]
        collect.target = sum(sizes)
        for i, n in enumerate(sizes):
            chunk = os.urandom(n)
            sent.update(chunk)
            total += n
            transport.write(chunk)
            if i % 100 == 0:
                await asyncio.sleep(0)
        await asyncio.wait_for(collect.got_all, 30)
        assert collect.n == total
        assert collect.h.hexdigest() == sent.hexdigest()
        if fast:  # asyncio's own read path ran for the handshake's end at most, not per read
            assert slow_reads <= 4, f"{slow_reads} reads took asyncio's path"
        else:
            assert slow_reads > 4
        transport.close()  # close_notify: the echo sees end of stream and closes too
        await asyncio.wait_for(echoes[0].eof, 10)
        assert await asyncio.wait_for(collect.lost, 10) is None
    finally:
        server.close()
