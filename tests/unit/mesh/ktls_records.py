"""A software TLS 1.3 record layer (RFC 8446 §5.2-5.3) standing in for the kernel's, so the
keys and sequence numbers we would install can be checked on a kernel without kTLS."""

from __future__ import annotations

import socket

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from mesh.ktls import CipherSpec, DirectionKeys


def _aead(spec: CipherSpec, key: bytes) -> AESGCM | ChaCha20Poly1305:
    return ChaCha20Poly1305(key) if "CHACHA" in spec.suite else AESGCM(key)


def _nonce(iv: bytes, seq: int) -> bytes:
    return bytes(a ^ b for a, b in zip(iv, seq.to_bytes(12, "big"), strict=True))


def seal(spec: CipherSpec, keys: DirectionKeys, seq: int, ctype: int, data: bytes) -> bytes:
    inner = data + bytes([ctype])
    header = b"\x17\x03\x03" + (len(inner) + 16).to_bytes(2, "big")
    return header + _aead(spec, keys.key).encrypt(_nonce(keys.iv, seq), inner, header)


def open_record(
    spec: CipherSpec, keys: DirectionKeys, seq: int, record: bytes
) -> tuple[int, bytes]:
    header, body = record[:5], record[5:]
    inner = _aead(spec, keys.key).decrypt(_nonce(keys.iv, seq), body, header).rstrip(b"\0")
    return inner[-1], inner[:-1]


def split_records(data: bytes) -> list[bytes]:
    out = []
    i = 0
    while i + 5 <= len(data):
        n = int.from_bytes(data[i + 3 : i + 5], "big")
        out.append(data[i : i + 5 + n])
        i += 5 + n
    assert i == len(data), "trailing partial record"
    return out


def recv_records(sock: socket.socket, count: int, timeout: float = 5.0) -> list[bytes]:
    """Exactly `count` whole records from a blocking socket."""
    sock.settimeout(timeout)
    buf = b""
    while True:
        recs = []
        i = 0
        while i + 5 <= len(buf):
            n = int.from_bytes(buf[i + 3 : i + 5], "big")
            if i + 5 + n > len(buf):
                break
            recs.append(buf[i : i + 5 + n])
            i += 5 + n
        if len(recs) >= count:
            return recs[:count]
        chunk = sock.recv(65536)
        assert chunk, f"peer closed after {len(recs)} of {count} records"
        buf += chunk
