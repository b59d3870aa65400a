"""An HBONE peer that misbehaves on purpose: real TLS (any certificate, or none), a real h2
client state machine driven by hand, so a test can send exactly the frames an attacker would
(streams before SETTINGS, resets right after HEADERS, huge header blocks). Plus the process
figures every adversarial case checks: open fds and RSS.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from certs.ca import CertificateAuthority
from mesh.tls import client_context


def fd_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def tls_context(ca: CertificateAuthority | None, identity: str | None) -> ssl.SSLContext:
    """A client context: the mesh CA's SVID for `identity`, or (ca None) no certificate and
    no verification (an outsider)."""
    if ca is not None and identity is not None:
        return client_context(ca.issue(identity), ca.bundle_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    return ctx


@dataclass
class Peer:
    """One raw HBONE client connection; `events` collects what h2 parsed from the server."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    h2: h2.connection.H2Connection
    responses: dict[int, int] = field(default_factory=dict)  # stream id -> :status
    resets: dict[int, int] = field(default_factory=dict)  # stream id -> error code
    goaway: int | None = None
    closed: bool = False
    server_settings_seen: bool = False
    data: dict[int, bytearray] = field(default_factory=dict)

    def flush(self) -> None:
        out = self.h2.data_to_send()
        if out:
            self.writer.write(out)

    def _unlimited(self) -> None:
        """The server's advertised stream limit must not stop the attacker's own h2."""
        self.h2.remote_settings[SettingCodes.MAX_CONCURRENT_STREAMS] = 100000
        self.h2.remote_settings.acknowledge()

    def connect(self, authority: str, headers: Sequence[tuple[str, str]] = ()) -> int:
        self._unlimited()
        sid = int(self.h2.get_next_available_stream_id())
        self.h2.send_headers(
            sid, [(":method", "CONNECT"), (":authority", authority), *headers], end_stream=False
        )
        return sid

    def request(self, headers: Sequence[tuple[str, str]], end: bool = True) -> int:
        self._unlimited()
        sid = int(self.h2.get_next_available_stream_id())
        self.h2.send_headers(sid, list(headers), end_stream=end)
        return sid

    def reset(self, sid: int, code: int = ErrorCodes.CANCEL) -> None:
        self.h2.reset_stream(sid, code)

    async def pump(self, until: float = 2.0, *, settle: float = 0.3) -> None:
        """Read and handle frames until nothing arrived for `settle` s (or `until` s passed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + until
        while loop.time() < deadline and not self.closed:
            try:
                chunk = await asyncio.wait_for(self.reader.read(1 << 16), settle)
            except TimeoutError:
                return
            except (ConnectionError, ssl.SSLError):
                self.closed = True
                return
            if not chunk:
                self.closed = True
                return
            self.feed(chunk)
            self.flush()

    def feed(self, chunk: bytes) -> None:
        try:
            events = self.h2.receive_data(chunk)
        except h2.exceptions.ProtocolError:
            self.closed = True
            return
        for ev in events:
            if isinstance(ev, h2.events.ResponseReceived):
                self.responses[ev.stream_id] = int(dict(ev.headers)[":status"])  # type: ignore[index]
            elif isinstance(ev, h2.events.StreamReset):
                self.resets[ev.stream_id] = int(ev.error_code or 0)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = int(ev.error_code or 0)
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                self.server_settings_seen = True
            elif isinstance(ev, h2.events.DataReceived):
                self.data.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)

    async def wait_for(self, sid: int, until: float = 5.0) -> int | None:
        """The :status of stream `sid` (None if it was reset or nothing came)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + until
        while sid not in self.responses and sid not in self.resets and not self.closed:
            if loop.time() > deadline:
                break
            await self.pump(until=0.2, settle=0.05)
        return self.responses.get(sid)

    def close(self) -> None:
        self.writer.close()


async def open_peer(
    host: str,
    port: int,
    ctx: ssl.SSLContext,
    *,
    sock: socket.socket | None = None,
    send_preface: bool = True,
) -> Peer:
    """TLS to an HBONE listener; with `send_preface` the client preface and SETTINGS go out
    at once, without waiting for the server's (as an impatient attacker does)."""
    if sock is not None:
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=ctx, server_hostname="hbone.mesh"
        )
    else:
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ctx, server_hostname="hbone.mesh"
        )
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    # the attacker's own h2 must not stop it from sending what it wants
    conn.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000}
    )
    peer = Peer(reader, writer, conn)
    if send_preface:
        conn.initiate_connection()
        peer.flush()
    return peer
