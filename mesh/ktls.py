"""Kernel TLS (kTLS): let the kernel run the TLS record layer after a user-space handshake.

Once the TLS 1.3 handshake is done, the traffic keys are installed in the socket
(`TCP_ULP "tls"`, then `SOL_TLS`/`TLS_TX` and `TLS_RX`) and from then on the proxy reads and
writes plaintext: encryption happens in the kernel's send path without a copy through Python
(DESIGN.md §1, §7). Python 3.11's `socket` module has none of the constants, so they live here,
once, with the `struct tls12_crypto_info_*` layouts from `include/uapi/linux/tls.h`.

This module holds the probe (does this kernel do kTLS at all?) and the operator's choice
(`auto | on | off`); the handshake and offload machinery follow in the same module so both
ztunnel and the waypoint share one implementation.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import functools
import logging
import os
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from OpenSSL import SSL, crypto

from mesh.identity.svid import Svid
from mesh.tls import ALPN_H2

log = logging.getLogger("mesh.ktls")

# -- kernel ABI (include/uapi/linux/tls.h, include/uapi/linux/tcp.h) -----------------------

TCP_ULP = 31
SOL_TLS = 282
TLS_TX = 1
TLS_RX = 2

TLS_1_2_VERSION = 0x0303
TLS_1_3_VERSION = 0x0304

TLS_CIPHER_AES_GCM_128 = 51
TLS_CIPHER_AES_GCM_256 = 52
TLS_CIPHER_CHACHA20_POLY1305 = 54

# cmsg types at level SOL_TLS
TLS_SET_RECORD_TYPE = 1
TLS_GET_RECORD_TYPE = 2

# TLS record content types (RFC 8446 §5.1)
RECORD_CHANGE_CIPHER_SPEC = 20
RECORD_ALERT = 21
RECORD_HANDSHAKE = 22
RECORD_APPLICATION_DATA = 23


@dataclass(frozen=True)
class CipherSpec:
    """One TLS 1.3 suite as the kernel wants it: sizes of the `tls12_crypto_info_*` fields.

    TLS 1.3's 12-byte per-record nonce base is split by the kernel into `salt` (the first
    bytes) and `iv` (the rest) for GCM, and is all `iv` for ChaCha20-Poly1305."""

    suite: str  # IANA / OpenSSL name
    cipher_type: int
    key_size: int
    salt_size: int
    iv_size: int
    hash_name: str  # the suite's HKDF hash

    @property
    def struct(self) -> struct.Struct:
        # struct tls_crypto_info { u16 version; u16 cipher_type; } then iv, key, salt, rec_seq
        return struct.Struct(f"=HH{self.iv_size}s{self.key_size}s{self.salt_size}s8s")

    def crypto_info(self, key: bytes, iv: bytes, seq: int) -> bytes:
        """The `setsockopt(SOL_TLS, TLS_TX|TLS_RX, ...)` value for TLS 1.3 traffic keys."""
        if len(key) != self.key_size or len(iv) != self.salt_size + self.iv_size:
            raise ValueError(f"{self.suite}: wrong key/iv length {len(key)}/{len(iv)}")
        return self.struct.pack(
            TLS_1_3_VERSION,
            self.cipher_type,
            iv[self.salt_size :],
            key,
            iv[: self.salt_size],
            seq.to_bytes(8, "big"),
        )


AES_128_GCM = CipherSpec("TLS_AES_128_GCM_SHA256", TLS_CIPHER_AES_GCM_128, 16, 4, 8, "sha256")
AES_256_GCM = CipherSpec("TLS_AES_256_GCM_SHA384", TLS_CIPHER_AES_GCM_256, 32, 4, 8, "sha384")
CHACHA20_POLY1305 = CipherSpec(
    "TLS_CHACHA20_POLY1305_SHA256", TLS_CIPHER_CHACHA20_POLY1305, 32, 0, 12, "sha256"
)
CIPHERS: dict[str, CipherSpec] = {c.suite: c for c in (AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305)}


# -- probe ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class KtlsSupport:
    """What the running kernel can do; `reason` says why not when `available` is False."""

    available: bool
    reason: str
    ciphers: tuple[str, ...] = ()
    kernel: str = ""

    def as_dict(self) -> dict[str, object]:
        return {
            "available": self.available,
            "reason": self.reason,
            "ciphers": list(self.ciphers),
            "kernel": self.kernel,
        }


def _loopback_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair: the TLS ULP attaches only to established TCP sockets."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    return a, b


def _ulp_error(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "kernel has no TLS ULP (CONFIG_TLS unset or module not loaded: modprobe tls)"
    if exc.errno == errno.ENOPROTOOPT:
        return "kernel does not know TCP_ULP (too old for kTLS)"
    return f"setsockopt(TCP_ULP, tls) failed: {exc}"


def _probe_cipher(spec: CipherSpec) -> str | None:
    """None when TX and RX keys of this suite install on a fresh pair, else why not."""
    a, b = _loopback_pair()
    try:
        a.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
        info = spec.crypto_info(bytes(spec.key_size), bytes(spec.salt_size + spec.iv_size), 0)
        a.setsockopt(SOL_TLS, TLS_TX, info)
        a.setsockopt(SOL_TLS, TLS_RX, info)
        return None
    except OSError as exc:
        return str(exc)
    finally:
        a.close()
        b.close()


def _probe() -> KtlsSupport:
    kernel = os.uname().release
    try:
        a, b = _loopback_pair()
    except OSError as exc:
        return KtlsSupport(False, f"cannot open a loopback TCP pair to probe: {exc}", (), kernel)
    try:
        a.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
    except OSError as exc:
        return KtlsSupport(False, _ulp_error(exc), (), kernel)
    finally:
        a.close()
        b.close()
    ciphers: list[str] = []
    failures: list[str] = []
    for spec in CIPHERS.values():
        err = _probe_cipher(spec)
        if err is None:
            ciphers.append(spec.suite)
        else:
            failures.append(f"{spec.suite}: {err}")
    if not ciphers:
        return KtlsSupport(
            False,
            "TLS ULP present but no TLS 1.3 cipher installs: " + "; ".join(failures),
            (),
            kernel,
        )
    return KtlsSupport(True, "", tuple(ciphers), kernel)


@functools.cache
def probe() -> KtlsSupport:
    """Probe once per process: the kernel's abilities do not change while we run."""
    return _probe()


# -- the operator's choice -----------------------------------------------------------------


class KtlsMode(enum.Enum):
    AUTO = "auto"
    ON = "on"
    OFF = "off"

    @classmethod
    def parse(cls, value: str) -> KtlsMode:
        try:
            return cls(value.strip().lower())
        except ValueError:
            raise ValueError(f"ktls: {value!r} is not one of auto, on, off") from None


class KtlsUnavailableError(RuntimeError):
    """`ktls: on` was asked for and the kernel cannot do it: refuse to start rather than
    silently run user-space TLS the operator explicitly did not want."""


def resolve(mode: KtlsMode | str, support: KtlsSupport | None = None) -> bool:
    """Whether to offload: `off` never, `auto` when the kernel can, `on` or an error."""
    if isinstance(mode, str):
        mode = KtlsMode.parse(mode)
    if mode is KtlsMode.OFF:
        return False
    support = probe() if support is None else support
    if mode is KtlsMode.ON and not support.available:
        raise KtlsUnavailableError(f"ktls: on, but this kernel cannot: {support.reason}")
    return support.available


def describe(mode: KtlsMode | str, support: KtlsSupport | None = None) -> dict[str, object]:
    """For the config dump, `meshctl doctor` and the `ambientmesh_ktls_enabled` gauge."""
    if isinstance(mode, str):
        mode = KtlsMode.parse(mode)
    support = probe() if support is None else support
    try:
        enabled = resolve(mode, support)
    except KtlsUnavailableError:
        enabled = False
    return {"mode": mode.value, "enabled": enabled, "kernel": support.as_dict()}


# -- key schedule (RFC 8446 §7.1, §7.3) ----------------------------------------------------


def hkdf_expand_label(
    secret: bytes, label: bytes, context: bytes, length: int, hash_name: str
) -> bytes:
    """HKDF-Expand-Label: HKDF-Expand with the `tls13 `-prefixed HkdfLabel as info."""
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + bytes([len(context)]) + context
    algorithm: hashes.HashAlgorithm = hashes.SHA384() if hash_name == "sha384" else hashes.SHA256()
    return HKDFExpand(algorithm, length, info).derive(secret)


def traffic_keys(spec: CipherSpec, secret: bytes) -> tuple[bytes, bytes]:
    """(key, 12-byte nonce base) for one direction from its application traffic secret."""
    key = hkdf_expand_label(secret, b"key", b"", spec.key_size, spec.hash_name)
    iv = hkdf_expand_label(secret, b"iv", b"", 12, spec.hash_name)
    return key, iv


@dataclass(frozen=True)
class DirectionKeys:
    key: bytes
    iv: bytes
    seq: int  # the sequence number of the next record in this direction

    def __repr__(self) -> str:  # keys never reach logs
        return f"DirectionKeys(seq={self.seq})"


@dataclass(frozen=True)
class TrafficKeys:
    spec: CipherSpec
    tx: DirectionKeys
    rx: DirectionKeys


# -- TLS contexts (pyOpenSSL: the stdlib hides the traffic secrets) ------------------------


class KtlsError(Exception):
    """A kTLS connection failed: handshake, key installation, or a record the kernel or we
    refused. The connection is closed; no byte of a refused record was delivered."""


class _Secrets:
    """Per-connection traffic secrets, filled by the context's keylog callback."""

    __slots__ = ("client", "client_random", "server")

    def __init__(self) -> None:
        self.client_random = b""
        self.client: bytes | None = None
        self.server: bytes | None = None


def _keylog(conn: SSL.Connection, line: bytes) -> None:
    """OpenSSL hands every secret of every connection of the context here; keep only the
    application traffic secrets, and only for the connection whose client random they name."""
    label, _, rest = line.partition(b" ")
    if label not in (b"CLIENT_TRAFFIC_SECRET_0", b"SERVER_TRAFFIC_SECRET_0"):
        return
    secrets = conn.get_app_data()
    if not isinstance(secrets, _Secrets):
        return
    random_hex, _, secret_hex = rest.partition(b" ")
    if not secrets.client_random:
        secrets.client_random = conn.client_random() or b""
    if bytes.fromhex(random_hex.decode()) != secrets.client_random:
        return
    if label == b"CLIENT_TRAFFIC_SECRET_0":
        secrets.client = bytes.fromhex(secret_hex.decode())
    else:
        secrets.server = bytes.fromhex(secret_hex.decode())


@dataclass(frozen=True)
class KtlsContext:
    """A pyOpenSSL context set up like `mesh.tls`'s: TLS 1.3 only, mutual, ALPN h2, chain
    verified against the trust bundle; SPIFFE checks happen after the handshake."""

    ssl: SSL.Context
    server_side: bool
    ciphers: tuple[str, ...]


def _kernel_ciphers(ciphers: Sequence[str] | None) -> tuple[str, ...]:
    if ciphers is None:
        support = probe()
        ciphers = support.ciphers if support.available else tuple(CIPHERS)
    unknown = [c for c in ciphers if c not in CIPHERS]
    if unknown or not ciphers:
        raise ValueError(f"ktls ciphers: {unknown or 'none'} not among {sorted(CIPHERS)}")
    return tuple(ciphers)


def _context(
    svid: Svid, bundle_pem: bytes, server_side: bool, ciphers: Sequence[str] | None
) -> KtlsContext:
    suites = _kernel_ciphers(ciphers)
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    # Only suites the kernel can take over: negotiating one it cannot would strand us.
    ctx.set_tls13_ciphersuites(":".join(suites).encode())
    ctx.use_privatekey(svid.key)
    ctx.use_certificate(svid.leaf)
    for cert in svid.chain[1:]:
        ctx.add_extra_chain_cert(cert)
    ctx.check_privatekey()
    store = ctx.get_cert_store()
    assert store is not None
    for cert in x509.load_pem_x509_certificates(bundle_pem):
        store.add_cert(crypto.X509.from_cryptography(cert))
    mode = SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if server_side else 0)
    ctx.set_verify(mode)
    ctx.set_keylog_callback(_keylog)
    # pyOpenSSL cannot set num_tickets = 0; stateful tickets with no cache are the smallest,
    # and the record accounting below copes with any number of them.
    ctx.set_options(SSL.OP_NO_TICKET)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    if server_side:
        ctx.set_alpn_select_callback(_select_h2)
    else:
        ctx.set_alpn_protos([ALPN_H2.encode()])
    return KtlsContext(ctx, server_side, suites)


def _select_h2(conn: SSL.Connection, offered: list[bytes]) -> Any:
    return ALPN_H2.encode() if ALPN_H2.encode() in offered else SSL.NO_OVERLAPPING_PROTOCOLS


def client_context(
    svid: Svid, bundle_pem: bytes, ciphers: Sequence[str] | None = None
) -> KtlsContext:
    return _context(svid, bundle_pem, False, ciphers)


def server_context(
    svid: Svid, bundle_pem: bytes, ciphers: Sequence[str] | None = None
) -> KtlsContext:
    return _context(svid, bundle_pem, True, ciphers)


# -- the handshake, sans-IO ----------------------------------------------------------------

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


class Handshake:
    """Drives one pyOpenSSL handshake over memory BIOs, one whole record at a time.

    Feeding exactly one record per step is what makes the sequence numbers exact: when the
    handshake completes, OpenSSL has consumed nothing past the peer's last handshake record,
    so everything still in the socket is the kernel's from record 0 on (a server's session
    tickets included: the kernel reports them as handshake records and we skip them). On our
    side, the records OpenSSL emits in the step that completes a *server* handshake are its
    session tickets, already under the application key: they set the TX sequence number."""

    def __init__(self, ctx: KtlsContext) -> None:
        self.ctx = ctx
        self.conn = SSL.Connection(ctx.ssl, None)
        self.secrets = _Secrets()
        self.conn.set_app_data(self.secrets)
        if ctx.server_side:
            self.conn.set_accept_state()
        else:
            self.conn.set_connect_state()
        self.done = False
        self.tx_seq = 0

    def _output(self) -> bytes:
        out = bytearray()
        while True:
            try:
                chunk = self.conn.bio_read(65536)
            except SSL.WantReadError:
                return bytes(out)
            if not chunk:
                return bytes(out)
            out += chunk

    def step(self, record: bytes | None) -> bytes:
        """Feed one record (None to start); returns bytes to send. Raises KtlsError on a
        failed handshake, after which `alert()` has the alert OpenSSL wants sent."""
        if record:
            self.conn.bio_write(record)
        try:
            self.conn.do_handshake()
        except SSL.WantReadError:
            return self._output()
        except SSL.Error as exc:
            self._failed_output = self._output()
            raise KtlsError(f"TLS handshake failed: {_ssl_reason(exc)}") from None
        out = self._output()
        self.done = True
        if self.ctx.server_side:
            self.tx_seq = count_records(out)
        return out

    def alert(self) -> bytes:
        return getattr(self, "_failed_output", b"")

    def keys(self) -> TrafficKeys:
        """The application traffic keys, once `done`."""
        if not self.done:
            raise KtlsError("handshake not complete")
        if self.conn.get_protocol_version_name() != "TLSv1.3":
            raise KtlsError(f"negotiated {self.conn.get_protocol_version_name()}, need TLSv1.3")
        name = self.conn.get_cipher_name() or ""
        spec = CIPHERS.get(name)
        if spec is None:
            raise KtlsError(f"negotiated cipher {name!r} has no kernel offload")
        s = self.secrets
        if s.client is None or s.server is None:
            raise KtlsError("traffic secrets were not logged for this connection")
        ckey, civ = traffic_keys(spec, s.client)
        skey, siv = traffic_keys(spec, s.server)
        client = DirectionKeys(ckey, civ, 0)
        server = DirectionKeys(skey, siv, 0)
        if self.ctx.server_side:
            return TrafficKeys(spec, DirectionKeys(skey, siv, self.tx_seq), client)
        return TrafficKeys(spec, client, server)

    def peer_der(self) -> bytes | None:
        cert = self.conn.get_peer_certificate(as_cryptography=True)
        return cert.public_bytes(serialization.Encoding.DER) if cert is not None else None

    def alpn(self) -> str | None:
        proto = self.conn.get_alpn_proto_negotiated()
        return proto.decode() if proto else None


def _ssl_reason(exc: SSL.Error) -> str:
    parts = [str(e[2]) for e in (exc.args[0] if exc.args and isinstance(exc.args[0], list) else [])]
    return "; ".join(p for p in parts if p) or str(exc) or type(exc).__name__


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


# -- socket glue ---------------------------------------------------------------------------


def install(sock: socket.socket, keys: TrafficKeys) -> bool:
    """Hand the record layer to the kernel; the socket carries plaintext from now on.

    False when the ULP would not attach, before anything changed: TCP must still be
    ESTABLISHED, so a peer that already sent FIN (it wrote and half-closed right after its
    Finished) leaves the socket in CLOSE_WAIT and this connection stays in user space.
    A failure after the ULP attached cannot be undone and is an error."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return False
        raise KtlsError(f"attaching the TLS ULP failed: {exc}") from None
    try:
        tx, rx = keys.tx, keys.rx
        sock.setsockopt(SOL_TLS, TLS_TX, keys.spec.crypto_info(tx.key, tx.iv, tx.seq))
        sock.setsockopt(SOL_TLS, TLS_RX, keys.spec.crypto_info(rx.key, rx.iv, rx.seq))
    except OSError as exc:
        raise KtlsError(f"installing {keys.spec.suite} keys in the kernel failed: {exc}") from None
    # Lets the kernel decrypt TLS 1.3 records in place (6.0+); an optimisation only.
    with contextlib.suppress(OSError):
        sock.setsockopt(SOL_TLS, TLS_RX_EXPECT_NO_PAD, 1)
    return True


TLS_RX_EXPECT_NO_PAD = 4


async def _read_record(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """Exactly one TLS record from the socket, never a byte more (see `Handshake`)."""
    header = await _read_exactly(loop, sock, RECORD_HEADER)
    length = int.from_bytes(header[3:5], "big")
    if length > MAX_RECORD:
        raise KtlsError(f"TLS record of {length} bytes exceeds the protocol limit")
    return header + await _read_exactly(loop, sock, length)


async def _read_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = await loop.sock_recv_into(sock, view[got:])
        if k == 0:
            raise KtlsError("peer closed the connection during the TLS handshake")
        got += k
    return bytes(buf)


@dataclass(frozen=True)
class KtlsSession:
    """What the handshake established. Quacks like the parts of `ssl.SSLObject` the HBONE
    code reads, so the same peer checks run whichever TLS implementation carried them."""

    cipher_suite: str
    alpn: str | None
    peer_der: bytes | None
    tx_seq: int
    rx_seq: int
    # Set when the keys could not go to the kernel: the record layer stays in OpenSSL.
    user_space: SSL.Connection | None = field(default=None, compare=False, repr=False)

    @property
    def offloaded(self) -> bool:
        return self.user_space is None

    def selected_alpn_protocol(self) -> str | None:
        return self.alpn

    def getpeercert(self, binary_form: bool = False) -> bytes | None:
        if not binary_form:
            raise ValueError("kTLS sessions expose the peer certificate in DER form only")
        return self.peer_der

    def version(self) -> str:
        return "TLSv1.3"

    def cipher(self) -> tuple[str, str, int]:
        return (self.cipher_suite, "TLSv1.3", CIPHERS[self.cipher_suite].key_size * 8)


async def handshake(
    sock: socket.socket, ctx: KtlsContext, *, offload: bool = True
) -> tuple[KtlsSession, Handshake]:
    """Run the TLS 1.3 handshake on a connected non-blocking socket and, with `offload`,
    install the keys; without (or when the kernel would not take them) the session carries
    the OpenSSL connection for a user-space record layer. The caller bounds it with a timeout
    and closes `sock` on error."""
    loop = asyncio.get_running_loop()
    hs = Handshake(ctx)
    record: bytes | None = None
    while True:
        try:
            out = hs.step(record)
        except KtlsError:
            with contextlib.suppress(OSError):
                alert = hs.alert()
                if alert:
                    await loop.sock_sendall(sock, alert)
            raise
        if out:
            await loop.sock_sendall(sock, out)
        if hs.done:
            break
        record = await _read_record(loop, sock)
    keys = hs.keys()
    in_kernel = install(sock, keys) if offload else False
    session = KtlsSession(
        keys.spec.suite,
        hs.alpn(),
        hs.peer_der(),
        keys.tx.seq,
        keys.rx.seq,
        None if in_kernel else hs.conn,
    )
    if offload and not in_kernel:
        log.debug("ktls: peer half-closed during the handshake; this one stays in user space")
    return session, hs


async def client_handshake(sock: socket.socket, ctx: KtlsContext) -> KtlsSession:
    if ctx.server_side:
        raise ValueError("client_handshake needs a client context")
    return (await handshake(sock, ctx))[0]


async def server_handshake(sock: socket.socket, ctx: KtlsContext) -> KtlsSession:
    if not ctx.server_side:
        raise ValueError("server_handshake needs a server context")
    return (await handshake(sock, ctx))[0]


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


# -- dialing and serving -------------------------------------------------------------------

HANDSHAKE_TIMEOUT = 10.0


async def create_connection(
    protocol_factory: Callable[[], asyncio.Protocol],
    address: tuple[str, int],
    ctx: KtlsContext,
    *,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> tuple[KtlsTransport, asyncio.Protocol]:
    """TCP connect, TLS 1.3 handshake in user space, keys to the kernel, protocol attached."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        async with asyncio.timeout(handshake_timeout):
            await loop.sock_connect(sock, address)
            session = await client_handshake(sock, ctx)
    except BaseException:
        sock.close()
        raise
    protocol = protocol_factory()
    return transport_for(loop, sock, protocol, session), protocol


class KtlsServer(asyncio.AbstractServer):
    """A listener whose accepted connections are handshaken and offloaded before the
    protocol sees them. It owns its accept loop and every handshake task it starts."""

    def __init__(
        self,
        sock: socket.socket,
        ctx: KtlsContext | Callable[[], KtlsContext],
        protocol_factory: Callable[[], asyncio.Protocol],
        *,
        timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self._sock = sock
        self._ctx = ctx
        self._factory = protocol_factory
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = self._loop.create_future()
        self._accept = self._loop.create_task(self._accept_loop())
        self.handshake_failures = 0
        self.offloaded = 0  # connections whose records the kernel handles
        self.user_space = 0  # connections the kernel would not take (see `install`)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed.done() else (self._sock,)

    async def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = await self._loop.sock_accept(self._sock)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    await asyncio.sleep(0.1)  # out of descriptors: back off, keep serving
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            conn.setblocking(False)
            task = self._loop.create_task(self._handle(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            async with asyncio.timeout(self._timeout):
                # A provider is asked per connection: rotated certificates reach new
                # connections while live ones keep the keys they negotiated.
                ctx = self._ctx if isinstance(self._ctx, KtlsContext) else self._ctx()
                session = await server_handshake(conn, ctx)
        except (KtlsError, OSError, TimeoutError) as exc:
            self.handshake_failures += 1
            log.warning("ktls: handshake with %s failed: %s", _peername(conn), exc)
            conn.close()
            return
        except BaseException:
            conn.close()
            raise
        if session.offloaded:
            self.offloaded += 1
        else:
            self.user_space += 1
        transport_for(self._loop, conn, self._factory(), session)

    def close(self) -> None:
        if self._closed.done():
            return
        self._accept.cancel()
        for t in list(self._tasks):
            t.cancel()
        self._sock.close()
        self._closed.set_result(None)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return not self._closed.done()

    async def start_serving(self) -> None:
        return None

    async def serve_forever(self) -> None:
        await asyncio.shield(self._closed)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t


async def start_server(
    protocol_factory: Callable[[], asyncio.Protocol],
    host: str,
    port: int,
    ctx: KtlsContext | Callable[[], KtlsContext],
    *,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> KtlsServer:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=1024, reuse_port=False)
    sock.setblocking(False)
    return KtlsServer(sock, ctx, protocol_factory, timeout=handshake_timeout)
