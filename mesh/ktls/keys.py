"""The TLS 1.3 key schedule (RFC 8446 §7.1, §7.3): traffic secrets in, the key, IV and sequence
number the kernel wants out. Pure functions, tested with the RFC's vectors."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from mesh.ktls.abi import CipherSpec

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
