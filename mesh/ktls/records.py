"""TLS records seen after the handshake, sans-IO: counting them and deciding what a control
record (ticket, key update, alert) means for a kernel-owned connection."""

from __future__ import annotations

import enum

from mesh.ktls.abi import RECORD_ALERT, RECORD_APPLICATION_DATA, RECORD_HANDSHAKE
from mesh.ktls.errors import KtlsError

RECORD_HEADER = 5
MAX_RECORD = (1 << 14) + 256  # TLSCiphertext.length limit (RFC 8446 §5.2)


def count_records(data: bytes) -> int:
    """Whole TLS records in `data` (OpenSSL's output always ends on a record boundary)."""
    n = i = 0
    while i + RECORD_HEADER <= len(data):
        i += RECORD_HEADER + int.from_bytes(data[i + 3 : i + 5], "big")
        n += 1
    if i != len(data):
        raise KtlsError("handshake output does not end on a record boundary")
    return n


# -- post-handshake records, sans-IO -------------------------------------------------------

HANDSHAKE_NEW_SESSION_TICKET = 4
HANDSHAKE_KEY_UPDATE = 24
ALERT_CLOSE_NOTIFY = 0


class RecordAction(enum.Enum):
    DATA = "data"
    SKIP = "skip"
    EOF = "eof"


def interpret(record_type: int, payload: bytes) -> RecordAction:
    """What a decrypted record that the kernel returned means for the connection.

    Session tickets are useless to us (we never resume) and are skipped. A KeyUpdate would
    switch the peer to keys the kernel does not have (kernels before 6.13 cannot follow), so
    the next record would fail authentication: refuse now, with the reason. close_notify is a
    clean end of the stream; any other alert is the peer failing the connection."""
    if record_type == RECORD_APPLICATION_DATA:
        return RecordAction.DATA
    if record_type == RECORD_HANDSHAKE:
        i = 0
        while i < len(payload):
            if i + 4 > len(payload):
                raise KtlsError("truncated post-handshake message")
            msg_type = payload[i]
            length = int.from_bytes(payload[i + 1 : i + 4], "big")
            if msg_type == HANDSHAKE_KEY_UPDATE:
                raise KtlsError("peer sent a TLS KeyUpdate, which kernel TLS cannot follow")
            if msg_type != HANDSHAKE_NEW_SESSION_TICKET:
                raise KtlsError(f"unexpected post-handshake message type {msg_type}")
            i += 4 + length
        return RecordAction.SKIP
    if record_type == RECORD_ALERT:
        if len(payload) != 2:
            raise KtlsError(f"malformed alert record of {len(payload)} bytes")
        if payload[1] == ALERT_CLOSE_NOTIFY:
            return RecordAction.EOF
        raise KtlsError(f"peer sent TLS alert {payload[1]} (level {payload[0]})")
    raise KtlsError(f"unexpected TLS record type {record_type}")
