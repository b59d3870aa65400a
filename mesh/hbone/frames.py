"""The lean HTTP/2 path for DATA and WINDOW_UPDATE frames on established streams (sans-IO).

Profiling the node proxy under load showed `h2` spending most of the receive path on DATA
frames: a hex dump of every payload for a trace log line that is never printed, a copy into
its frame buffer, another into the frame object, and a state-machine walk per frame; on the
send side a frame object and a copy per frame. HTTP/2 in HBONE is almost all DATA, so
(DESIGN.md §7) DATA and WINDOW_UPDATE frames of streams that are already established take
this path, and h2 keeps everything else: the preface, SETTINGS, HEADERS, RST_STREAM, GOAWAY,
PING, END_STREAM and padded DATA, frames for streams we do not hold.

`FrameReader` splits the byte stream at frame boundaries. Payloads of fast DATA frames are
handed on as zero-copy slices of the received bytes, as they arrive (a frame need not be
complete); every other frame is gathered whole and handed to h2 in order, so h2 sees a
well-formed connection with the DATA of fast streams removed. Which frames are fast is the
`FrameSink`'s decision, asked at each frame header, after all earlier frames were handled.
"""

from __future__ import annotations

import struct
from typing import Generic, Protocol, TypeVar

# A frame header: 24-bit length (as 16 + 8 bits), type, flags, reserved bit + stream id.
HEADER = struct.Struct(">HBBBL")
WINDOW_INCREMENT = struct.Struct(">L")
HEADER_SIZE = 9
DATA = 0x0
WINDOW_UPDATE = 0x8
END_STREAM = 0x1
PADDED = 0x8
MAX_WINDOW = 2**31 - 1
CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

T = TypeVar("T")


FLOW_CONTROL_ERROR = 0x3
FRAME_SIZE_ERROR = 0x6


class FrameError(Exception):
    """The peer broke a rule the lean path checks; `code` is the HTTP/2 error for GOAWAY."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def data_header(stream_id: int, length: int, *, end_stream: bool = False) -> bytes:
    """The 9-byte header of a DATA frame carrying `length` bytes."""
    return HEADER.pack(length >> 8, length & 0xFF, DATA, END_STREAM if end_stream else 0, stream_id)


def window_update(stream_id: int, increment: int) -> bytes:
    """A whole WINDOW_UPDATE frame (stream 0 = the connection)."""
    return HEADER.pack(0, 4, WINDOW_UPDATE, 0, stream_id) + WINDOW_INCREMENT.pack(increment)


class FrameSink(Protocol[T]):
    """What the reader calls. `T` is whatever the sink uses to name a fast stream."""

    def fast_stream(self, stream_id: int) -> T | None:
        """The stream to hand this DATA frame's payload to directly, or None (h2 takes it)."""
        ...

    def on_data(self, stream: T, data: memoryview) -> None:
        """Part (or all) of a fast DATA frame's payload."""

    def on_window_update(self, stream_id: int, increment: int) -> bool:
        """True when handled here; False hands the frame to h2."""
        ...

    def on_frames(self, data: bytes) -> None:
        """Whole frames (and the preface) for h2, in order."""


class FrameReader(Generic[T]):
    """Splits received HTTP/2 bytes; see the module docstring. `preface` is the number of
    bytes before the first frame (the client preface, on the server side)."""

    __slots__ = ("_fast", "_hdr", "_left", "_preface", "_sink", "_slow", "_start", "max_frame")

    def __init__(self, sink: FrameSink[T], *, max_frame: int, preface: int = 0) -> None:
        self._sink = sink
        self.max_frame = max_frame
        self._preface = preface
        self._hdr = bytearray()  # a frame header split across reads
        self._left = 0  # body bytes of the current frame still to come
        self._fast: T | None = None  # the stream of the current fast DATA frame
        self._slow = bytearray()  # whole frames (and the part of one) for h2
        self._start = 0  # where the current slow frame starts in _slow

    def feed(self, data: bytes) -> None:
        mv = memoryview(data)
        off = 0
        end = len(data)
        sink = self._sink
        while off < end:
            if self._left:
                take = min(self._left, end - off)
                self._left -= take
                if self._fast is not None:
                    sink.on_data(self._fast, mv[off : off + take])
                    off += take
                    if not self._left:
                        self._fast = None
                else:
                    self._slow += mv[off : off + take]
                    off += take
                    if not self._left:
                        self._slow_frame_done()
                continue
            if self._preface:
                take = min(self._preface, end - off)
                self._slow += mv[off : off + take]
                self._preface -= take
                off += take
                continue
            if self._hdr or end - off < HEADER_SIZE:
                take = min(HEADER_SIZE - len(self._hdr), end - off)
                self._hdr += mv[off : off + take]
                off += take
                if len(self._hdr) < HEADER_SIZE:
                    break
                hdr: bytes | bytearray = self._hdr
                at = 0
            else:
                hdr, at = data, off
                off += HEADER_SIZE
            hi, lo, typ, flags, sid = HEADER.unpack_from(hdr, at)
            n = hi << 8 | lo
            sid &= 0x7FFFFFFF
            if n > self.max_frame:
                raise FrameError(
                    f"frame of {n} bytes exceeds the maximum {self.max_frame}", FRAME_SIZE_ERROR
                )
            if typ == DATA and n and not flags & (END_STREAM | PADDED):
                stream = sink.fast_stream(sid)
                if stream is not None:
                    if self._slow:
                        self._give_slow()
                    self._hdr.clear()
                    self._fast = stream
                    self._left = n
                    continue
            self._start = len(self._slow)
            self._slow += hdr[at : at + HEADER_SIZE]
            self._hdr.clear()
            self._left = n
            if not n:
                self._slow_frame_done()
        if self._slow:
            self._give_slow()

    def _slow_frame_done(self) -> None:
        """A whole frame gathered for h2: WINDOW_UPDATEs may still be the sink's."""
        slow, start = self._slow, self._start
        if slow[start + 3] == WINDOW_UPDATE and len(slow) - start == HEADER_SIZE + 4:
            (sid,) = WINDOW_INCREMENT.unpack_from(slow, start + 5)
            (inc,) = WINDOW_INCREMENT.unpack_from(slow, start + 9)
            if self._sink.on_window_update(sid & 0x7FFFFFFF, inc & 0x7FFFFFFF):
                del slow[start:]

    def _give_slow(self) -> None:
        """Hand h2 the whole frames gathered so far (never a partial one)."""
        if self._left and self._fast is None:  # the current slow frame is incomplete: keep it
            head = bytes(self._slow[: self._start])
            del self._slow[: self._start]
            self._start = 0
        else:
            head = bytes(self._slow)
            self._slow.clear()
        if head:
            self._sink.on_frames(head)
