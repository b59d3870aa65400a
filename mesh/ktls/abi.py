"""The kernel's kTLS ABI: Python 3.11's `socket` module has none of the constants, so they live
here, once, with the `struct tls12_crypto_info_*` layouts from `include/uapi/linux/tls.h`."""

from __future__ import annotations

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


TLS_RX_EXPECT_NO_PAD = 4
