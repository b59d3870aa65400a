"""An SVID: a workload's key plus its certificate chain, kept in memory only."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec


class CertificateError(ValueError):
    """A CSR or issuance request the CA refuses, or a certificate nobody can use; the message
    says why. It lives beside `Svid` so both proxies can catch it without importing the CA."""


@dataclass(frozen=True)
class Svid:
    """Leaf first, intermediates after; the root is the trust bundle, never part of the chain."""

    identity: str
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...]

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    @property
    def not_before(self) -> datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.leaf.not_valid_after_utc

    @property
    def serial(self) -> int:
        return self.leaf.serial_number

    @property
    def fingerprint(self) -> str:
        return self.leaf.fingerprint(hashes.SHA256()).hex()

    @property
    def refresh_at(self) -> datetime:
        """Half life: leaves time to retry a failing CA before the old cert expires."""
        return self.not_before + (self.not_after - self.not_before) / 2

    def expired(self, now: datetime) -> bool:
        return now >= self.not_after
