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

import enum
import errno
import functools
import os
import socket
import struct
from dataclasses import dataclass

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
