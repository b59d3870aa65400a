"""Kernel TLS (kTLS): let the kernel run the TLS record layer after a user-space handshake.

Once the TLS 1.3 handshake is done, the traffic keys are installed in the socket
(`TCP_ULP "tls"`, then `SOL_TLS`/`TLS_TX` and `TLS_RX`) and from then on the proxy reads and
writes plaintext: encryption happens in the kernel's send path without a copy through Python
(DESIGN.md §1, §7). ztunnel and the waypoint share this one implementation.

The package is split along the stages a connection goes through, each testable alone:
`abi` (the kernel's constants and struct layouts), `probe` (does this kernel do kTLS, and
what did the operator ask for), `keys` (the RFC 8446 key schedule), `handshake` (the
memory-BIO handshake, sans-IO), `records` (post-handshake records, sans-IO), `session`
(socket glue: handshake over a socket, install the keys), `transport` (the kernel and the
user-space transports) and `server` (dialing and serving). Callers use the names below
(`from mesh import ktls; ktls.create_connection(...)`), whichever module defines them.
"""

from mesh.ktls.abi import (
    AES_128_GCM,
    AES_256_GCM,
    CHACHA20_POLY1305,
    CIPHERS,
    RECORD_ALERT,
    RECORD_APPLICATION_DATA,
    RECORD_CHANGE_CIPHER_SPEC,
    RECORD_HANDSHAKE,
    SOL_TLS,
    TCP_ULP,
    TLS_1_2_VERSION,
    TLS_1_3_VERSION,
    TLS_CIPHER_AES_GCM_128,
    TLS_CIPHER_AES_GCM_256,
    TLS_CIPHER_CHACHA20_POLY1305,
    TLS_GET_RECORD_TYPE,
    TLS_RX,
    TLS_RX_EXPECT_NO_PAD,
    TLS_SET_RECORD_TYPE,
    TLS_TX,
    CipherSpec,
)
from mesh.ktls.errors import KtlsError
from mesh.ktls.handshake import Handshake, KtlsContext, client_context, server_context
from mesh.ktls.keys import DirectionKeys, TrafficKeys, hkdf_expand_label, traffic_keys
from mesh.ktls.probe import KtlsMode, KtlsSupport, KtlsUnavailableError, describe, probe, resolve
from mesh.ktls.records import (
    ALERT_CLOSE_NOTIFY,
    HANDSHAKE_KEY_UPDATE,
    HANDSHAKE_NEW_SESSION_TICKET,
    MAX_RECORD,
    RECORD_HEADER,
    RecordAction,
    count_records,
    interpret,
)
from mesh.ktls.server import HANDSHAKE_TIMEOUT, KtlsServer, create_connection, start_server
from mesh.ktls.session import KtlsSession, client_handshake, handshake, install, server_handshake
from mesh.ktls.transport import (
    COUNTS,
    READ_SIZE,
    KtlsTransport,
    RecordLayerCounts,
    UserTlsTransport,
    transport_for,
)

__all__ = [
    "AES_128_GCM",
    "AES_256_GCM",
    "ALERT_CLOSE_NOTIFY",
    "CHACHA20_POLY1305",
    "CIPHERS",
    "COUNTS",
    "HANDSHAKE_KEY_UPDATE",
    "HANDSHAKE_NEW_SESSION_TICKET",
    "HANDSHAKE_TIMEOUT",
    "MAX_RECORD",
    "READ_SIZE",
    "RECORD_ALERT",
    "RECORD_APPLICATION_DATA",
    "RECORD_CHANGE_CIPHER_SPEC",
    "RECORD_HANDSHAKE",
    "RECORD_HEADER",
    "SOL_TLS",
    "TCP_ULP",
    "TLS_1_2_VERSION",
    "TLS_1_3_VERSION",
    "TLS_CIPHER_AES_GCM_128",
    "TLS_CIPHER_AES_GCM_256",
    "TLS_CIPHER_CHACHA20_POLY1305",
    "TLS_GET_RECORD_TYPE",
    "TLS_RX",
    "TLS_RX_EXPECT_NO_PAD",
    "TLS_SET_RECORD_TYPE",
    "TLS_TX",
    "CipherSpec",
    "DirectionKeys",
    "Handshake",
    "KtlsContext",
    "KtlsError",
    "KtlsMode",
    "KtlsServer",
    "KtlsSession",
    "KtlsSupport",
    "KtlsTransport",
    "KtlsUnavailableError",
    "RecordAction",
    "RecordLayerCounts",
    "TrafficKeys",
    "UserTlsTransport",
    "client_context",
    "client_handshake",
    "count_records",
    "create_connection",
    "describe",
    "handshake",
    "hkdf_expand_label",
    "install",
    "interpret",
    "probe",
    "resolve",
    "server_context",
    "server_handshake",
    "start_server",
    "traffic_keys",
    "transport_for",
]
