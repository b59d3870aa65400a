"""The two asyncio transports: plaintext over a kernel-offloaded socket, and the user-space
fallback when the kernel refused the keys, with counts of which one each connection got."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL

from mesh.ktls.abi import (
    RECORD_ALERT,
    RECORD_APPLICATION_DATA,
    SOL_TLS,
    TLS_GET_RECORD_TYPE,
    TLS_SET_RECORD_TYPE,
)
from mesh.ktls.errors import KtlsError
from mesh.ktls.handshake import _ssl_reason
from mesh.ktls.records import RecordAction, interpret
from mesh.ktls.session import KtlsSession

# -- the asyncio transport over an offloaded socket ----------------------------------------

READ_SIZE = 256 * 1024
_CMSG_SPACE = socket.CMSG_SPACE(1)
_CLOSE_NOTIFY = b"\x01\x00"  # warning, close_notify
_ALERT = [(SOL_TLS, TLS_SET_RECORD_TYPE, bytes([RECORD_ALERT]))]


def _rx_error(exc: OSError) -> KtlsError:
    if exc.errno == errno.EBADMSG:
        return KtlsError("TLS record failed authentication (corrupted or forged on the wire)")
    if exc.errno == errno.EMSGSIZE:
        return KtlsError("TLS record larger than the protocol allows")
    if exc.errno == errno.EINVAL:
        return KtlsError("malformed TLS record")
    return KtlsError(f"kTLS receive failed: {exc}")


class KtlsTransport(asyncio.Transport):
    """An asyncio transport over a socket whose record layer is in the kernel.

    The event loop's own socket transports read with `recv()`, which fails with EIO as soon as
    a non-data record (a session ticket, an alert) is next; this one reads with `recvmsg` and a
    control buffer, so every record arrives with its type and is handled by `interpret`.
    Writes go straight to `send()` (the kernel encrypts) and buffer only what the socket
    cannot take, pausing the protocol above the high-water mark."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol: asyncio.Protocol,
        session: KtlsSession,
    ) -> None:
        super().__init__(
            {
                "socket": sock,
                "peername": _peername(sock),
                "sockname": sock.getsockname(),
                "ssl_object": session,
                "ktls": session.offloaded,
                "cipher": session.cipher(),
            }
        )
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._session = session
        self._wbuf: list[memoryview] = []
        self._wsize = 0
        self._high = 1 << 20
        self._low = 1 << 18
        self._protocol_paused = False
        self._reading = True
        self._closing = False  # close() called: flush, close_notify, close
        self._eof_sent = False
        self._lost = False
        self._protocol.connection_made(self)
        if not self._lost and self._reading:
            self._loop.add_reader(self._fd, self._read_ready)

    # -- reading ---------------------------------------------------------------------------

    def _read_ready(self) -> None:
        try:
            data, anc, _flags, _ = self._sock.recvmsg(READ_SIZE, _CMSG_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(_rx_error(exc), alert=20 if exc.errno == errno.EBADMSG else 10)
            return
        record_type = RECORD_APPLICATION_DATA
        for level, kind, value in anc:
            if level == SOL_TLS and kind == TLS_GET_RECORD_TYPE and value:
                record_type = value[0]
        if record_type == RECORD_APPLICATION_DATA:
            if data:
                self._protocol.data_received(data)
            else:  # TCP FIN without close_notify: the peer went away
                self._eof()
            return
        try:
            action = interpret(record_type, data)
        except KtlsError as exc:
            self._fatal(exc, alert=10)
            return
        if action is RecordAction.EOF:
            self._eof()

    def _eof(self) -> None:
        self._loop.remove_reader(self._fd)
        self._reading = False
        keep_open = self._protocol.eof_received()
        if not keep_open:
            self.close()

    # -- writing ---------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._lost or self._closing or self._eof_sent:
            return
        if not data:
            return
        self._write_wire(data)

    def _write_wire(self, data: bytes | bytearray | memoryview) -> None:
        if not self._wbuf:
            try:
                n = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._fatal(KtlsError(f"kTLS send failed: {exc}"), alert=None)
                return
            if n == len(data):
                return
            self._loop.add_writer(self._fd, self._write_ready)
            data = memoryview(data)[n:]
        # Keep our own copy: callers may reuse their buffer once write() returns.
        self._wbuf.append(memoryview(bytes(data)))
        self._wsize += len(data)
        if not self._protocol_paused and self._wsize > self._high:
            self._protocol_paused = True
            self._protocol.pause_writing()

    def _write_ready(self) -> None:
        try:
            n = self._sock.sendmsg(self._wbuf[:64])
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(KtlsError(f"kTLS send failed: {exc}"), alert=None)
            return
        self._wsize -= n
        while n:
            head = self._wbuf[0]
            if n >= len(head):
                n -= len(head)
                self._wbuf.pop(0)
            else:
                self._wbuf[0] = head[n:]
                n = 0
        if self._protocol_paused and self._wsize <= self._low:
            self._protocol_paused = False
            self._protocol.resume_writing()
        if not self._wbuf:
            self._loop.remove_writer(self._fd)
            if self._eof_sent:
                self._send_close_notify()
            if self._closing:
                self._finish(None)

    def _send_close_notify(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.sendmsg([_CLOSE_NOTIFY], _ALERT)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """TLS 1.3 half-close: close_notify ends our direction only (RFC 8446 §6.1)."""
        if self._eof_sent or self._lost:
            return
        self._eof_sent = True
        if not self._wbuf:
            self._send_close_notify()

    def get_write_buffer_size(self) -> int:
        return self._wsize

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = 1 << 20 if high is None else high
        self._low = self._high // 4 if low is None else low

    # -- lifecycle -------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def is_reading(self) -> bool:
        return self._reading and not self._lost

    def pause_reading(self) -> None:
        if self._reading and not self._lost:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._reading and not self._lost and not self._closing:
            self._reading = True
            self._loop.add_reader(self._fd, self._read_ready)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def close(self) -> None:
        """Flush, send close_notify, close; `connection_lost(None)` follows."""
        if self._closing or self._lost:
            return
        self._closing = True
        self._loop.remove_reader(self._fd)
        if not self._wbuf:
            if not self._eof_sent:
                self._eof_sent = True
                self._send_close_notify()
            self._finish(None)
        else:
            self._eof_sent = True

    def abort(self) -> None:
        self._finish(None)

    def _fatal(self, exc: Exception, alert: int | None) -> None:
        """Fail the connection; a fatal alert tells the peer why when the socket still can."""
        if alert is not None and not self._eof_sent:
            with contextlib.suppress(OSError):
                self._sock.sendmsg([bytes([2, alert])], _ALERT)
        self._finish(exc)

    def _finish(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._wbuf.clear()
        self._wsize = 0
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)


class UserTlsTransport(KtlsTransport):
    """The same transport with OpenSSL doing the record layer, for the connection whose keys
    could not go to the kernel (see `install`). Ciphertext moves through the socket; the
    handshake's own pyOpenSSL connection, still holding its keys and sequence numbers,
    encrypts and decrypts."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol: asyncio.Protocol,
        session: KtlsSession,
    ) -> None:
        assert session.user_space is not None
        self._tls = session.user_space
        super().__init__(loop, sock, protocol, session)

    def _ciphertext(self) -> bytes:
        out = bytearray()
        while True:
            try:
                chunk = self._tls.bio_read(READ_SIZE)
            except SSL.WantReadError:
                break
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._lost or self._closing or self._eof_sent or not data:
            return
        self._tls.sendall(bytes(data))  # into the memory BIO: never blocks
        self._write_wire(self._ciphertext())

    def _read_ready(self) -> None:
        try:
            wire = self._sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(KtlsError(f"receive failed: {exc}"), alert=None)
            return
        if not wire:
            self._eof()
            return
        self._tls.bio_write(wire)
        plain = bytearray()
        end: Exception | None = None
        eof = False
        while True:
            try:
                plain += self._tls.recv(READ_SIZE)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                eof = True
                break
            except SSL.Error as exc:
                end = KtlsError(f"TLS record refused: {_ssl_reason(exc)}")
                break
        if plain:
            self._protocol.data_received(bytes(plain))
        if self._lost:
            return
        if end is not None:
            with contextlib.suppress(OSError):
                self._sock.send(self._ciphertext())  # OpenSSL's fatal alert
            self._finish(end)
        elif eof:
            self._eof()

    def _send_close_notify(self) -> None:
        with contextlib.suppress(SSL.Error):
            self._tls.shutdown()
        with contextlib.suppress(OSError):
            self._sock.send(self._ciphertext())
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    def _fatal(self, exc: Exception, alert: int | None) -> None:
        self._finish(exc)


@dataclass(slots=True)
class RecordLayerCounts:
    """Connections of this process, by where their TLS records went. A `--ktls auto` node
    whose connections land in `user_space` has a kernel that refused the keys (a cipher it
    lacks, say): the metric shows that instead of a silent slowdown."""

    kernel: int = 0
    user_space: int = 0


COUNTS = RecordLayerCounts()


def transport_for(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    protocol: asyncio.Protocol,
    session: KtlsSession,
) -> KtlsTransport:
    if session.offloaded:
        COUNTS.kernel += 1
        return KtlsTransport(loop, sock, protocol, session)
    COUNTS.user_space += 1
    return UserTlsTransport(loop, sock, protocol, session)


def _peername(sock: socket.socket) -> Any:
    try:
        return sock.getpeername()
    except OSError:
        return None
