"""Back-pressure through a tunnel (DESIGN.md §7): a destination that stops reading stops the
sender at the windows, instead of the proxies buffering without bound; when it reads again
every byte arrives, in order, and half-close still ends the stream.

Real TLS, real h2 framing on both ends (with the lean DATA path), real sockets.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

from certs.ca import CertificateAuthority
from mesh.hbone import ConnectRequest, HbonePool, serve
from mesh.identity.spiffe import node_id
from mesh.tcp import TcpEndpoint, join
from mesh.tls import client_context, server_context

TD = "cluster.local"
CLIENT = "spiffe://cluster.local/ns/shop/sa/frontend"
TOTAL = 96 << 20


async def test_slow_reader_stalls_the_sender_then_gets_every_byte(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    reading = asyncio.Event()
    digest: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reading.wait()  # the app is busy: its socket buffer fills, then ours
        h = hashlib.sha256()
        n = 0
        while data := await reader.read(1 << 20):
            h.update(data)
            n += len(data)
        digest.set_result((n, h.hexdigest()))
        writer.close()

    app = await asyncio.start_server(sink, "127.0.0.1", 0)
    app_port = app.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()

    async def handler(req: ConnectRequest) -> None:
        _, ep = await loop.create_connection(TcpEndpoint, "127.0.0.1", app_port)
        join(req.accept(), ep)

    server_id = node_id(TD, "n2")
    hbone = await serve(
        "127.0.0.1", 0, server_context(ca.issue(server_id), ca.bundle_pem), handler,
        trust_domain=TD,
    )  # fmt: skip
    ctx = client_context(ca.issue(CLIENT), ca.bundle_pem)
    pool = HbonePool(lambda _: ctx, trust_domain=TD)
    tasks: set[asyncio.Task[None]] = set()

    def outbound() -> TcpEndpoint:
        ep = TcpEndpoint()

        async def tunnel() -> None:
            stream = await pool.connect(
                CLIENT, ("127.0.0.1", hbone.sockets[0].getsockname()[1]),
                f"127.0.0.1:{app_port}", expected_peers=frozenset({server_id}),
            )  # fmt: skip
            join(ep, stream)

        t = loop.create_task(tunnel())
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        return ep

    out = await loop.create_server(outbound, "127.0.0.1", 0)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", out.sockets[0].getsockname()[1])
        writer.transport.set_write_buffer_limits(1 << 16)
        payload = os.urandom(1 << 20)
        sent = 0

        async def send_all() -> None:
            nonlocal sent
            for _ in range(TOTAL // len(payload)):
                writer.write(payload)
                await writer.drain()
                sent += len(payload)
            writer.write_eof()

        sender = loop.create_task(send_all())
        await asyncio.sleep(2.0)
        # Kernel buffers, the 1 MiB transport marks, the 4 MiB stream window: tens of MiB at
        # most are in flight. Without back-pressure everything would be "sent" by now.
        stalled_at = sent
        assert stalled_at < TOTAL // 2, f"{stalled_at >> 20} MiB accepted with nobody reading"
        assert not sender.done()
        reading.set()
        await asyncio.wait_for(sender, 60)
        n, hexdigest = await asyncio.wait_for(digest, 60)
        assert n == TOTAL
        assert hexdigest == hashlib.sha256(payload * (TOTAL // len(payload))).hexdigest()
        writer.close()
    finally:
        out.close()
        hbone.close()
        app.close()
        pool.close()
        for t in tasks:
            t.cancel()
