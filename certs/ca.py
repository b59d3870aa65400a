"""The mesh CA: a root key and certificate on disk, and the signing of SVIDs from CSRs.

The CA is the one place that decides what an identity certificate may say, so it signs only
what a mesh peer will accept: exactly one URI SAN that is a SPIFFE ID of this trust domain
(a workload `/ns/<ns>/sa/<sa>` or a node `/node/<name>`), nothing else, client and server
use, a bounded lifetime. Anything else is refused with a message saying why.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.identity.spiffe import SpiffeId
from mesh.identity.svid import CertificateError, Svid

ROOT_KEY = "root-key.pem"
ROOT_CERT = "root-cert.pem"
TRUST_DOMAIN_FILE = "trust-domain"
DEFAULT_TTL = timedelta(hours=24)
MAX_TTL = timedelta(days=30)
ROOT_TTL = timedelta(days=3650)
# Clock skew between nodes must not make a fresh certificate "not yet valid".
BACKDATE = timedelta(minutes=5)


class CaExistsError(CertificateError):
    pass


def _check_identity(identity: str, trust_domain: str) -> SpiffeId:
    try:
        sid = SpiffeId.parse(identity)
    except ValueError as exc:
        raise CertificateError(str(exc)) from None
    if sid.trust_domain != trust_domain:
        raise CertificateError(
            f"{identity}: trust domain {sid.trust_domain!r} is not this CA's {trust_domain!r}"
        )
    parts = sid.path.split("/")[1:]
    if not (sid.is_workload or (len(parts) == 2 and parts[0] == "node")):
        raise CertificateError(
            f"{identity}: not a workload identity (/ns/<ns>/sa/<sa>) or a node identity "
            "(/node/<name>)"
        )
    return sid


class CertificateAuthority:
    def __init__(
        self, root_key: ec.EllipticCurvePrivateKey, root: x509.Certificate, trust_domain: str
    ) -> None:
        self._key = root_key
        self.root = root
        self.trust_domain = trust_domain
        self.bundle_pem: bytes = root.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def init(
        cls, directory: str | Path, trust_domain: str = "cluster.local"
    ) -> CertificateAuthority:
        """Create a new root in `directory`. Refuses to replace an existing CA: its loss
        would invalidate every certificate in the mesh."""
        d = Path(directory)
        _check_identity(f"spiffe://{trust_domain}/node/check", trust_domain)
        d.mkdir(parents=True, exist_ok=True)
        if (d / ROOT_KEY).exists() or (d / ROOT_CERT).exists():
            raise CaExistsError(f"{d}: a CA already exists here; refusing to overwrite it")
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                x509.NameAttribute(NameOID.COMMON_NAME, f"ambientmesh root CA ({trust_domain})"),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + ROOT_TTL)
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Created 0600 from the start: never a moment when the key is readable by others.
        fd = os.open(d / ROOT_KEY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        (d / ROOT_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / TRUST_DOMAIN_FILE).write_text(trust_domain + "\n")
        return cls(key, cert, trust_domain)

    @classmethod
    def load(cls, directory: str | Path) -> CertificateAuthority:
        d = Path(directory)
        try:
            key = serialization.load_pem_private_key((d / ROOT_KEY).read_bytes(), None)
            cert = x509.load_pem_x509_certificate((d / ROOT_CERT).read_bytes())
            td = (d / TRUST_DOMAIN_FILE).read_text().strip()
        except FileNotFoundError as exc:
            raise CertificateError(f"{d}: not a CA directory ({exc.filename} missing)") from None
        except ValueError as exc:
            raise CertificateError(f"{d}: unreadable CA files: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertificateError(f"{d}/{ROOT_KEY}: not an EC private key")
        return cls(key, cert, td)

    def sign_csr(
        self,
        csr_pem: bytes,
        *,
        ttl: timedelta = DEFAULT_TTL,
        allowed_ids: object | None = None,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> tuple[x509.Certificate, ...]:
        """Validate a CSR and sign its leaf. `allowed_ids` (a container), when given, is the
        set of identities the caller may obtain; the CA service passes what the node may."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise CertificateError("CSR: not a PEM certificate signing request") from None
        if not csr.is_signature_valid:
            raise CertificateError("CSR: signature does not verify")
        pub = csr.public_key()
        if isinstance(pub, ec.EllipticCurvePublicKey):
            if not isinstance(pub.curve, ec.SECP256R1 | ec.SECP384R1):
                raise CertificateError(f"CSR: EC curve {pub.curve.name} not allowed (P-256/P-384)")
        elif isinstance(pub, rsa.RSAPublicKey):
            if pub.key_size < 2048:
                raise CertificateError(f"CSR: RSA key of {pub.key_size} bits is too small")
        else:
            raise CertificateError("CSR: key type not allowed (ECDSA P-256 or RSA >= 2048)")
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise CertificateError(
                "CSR: no subjectAltName; exactly one SPIFFE URI needed"
            ) from None
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) != 1 or len(list(san)) != 1:
            raise CertificateError(
                f"CSR: exactly one URI SAN and no other SAN allowed, got {len(list(san))} SANs"
            )
        identity = uris[0]
        _check_identity(identity, self.trust_domain)
        if allowed_ids is not None and identity not in allowed_ids:  # type: ignore[operator]
            raise CertificateError(f"{identity}: caller is not allowed this identity")
        if ttl <= timedelta(0) or ttl > MAX_TTL:
            raise CertificateError(f"ttl {ttl} out of range (0, {MAX_TTL}]")
        now = datetime.now(UTC)
        # Backdated for clock skew, but by at most a quarter of the lifetime: the half-life
        # refresh point must stay in the future for short-lived certificates too.
        nb = not_before or now - min(BACKDATE, ttl / 4)
        na = not_after or now + ttl
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.root.subject)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(nb)
            .not_valid_after(na)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_encipherment=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    content_commitment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return (leaf,)

    def issue(
        self,
        identity: str,
        ttl: timedelta = DEFAULT_TTL,
        *,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> Svid:
        """Generate a key and sign it: for operators (`meshctl ca issue`) and tests."""
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        chain = self.sign_csr(
            csr.public_bytes(serialization.Encoding.PEM),
            ttl=ttl,
            not_before=not_before,
            not_after=not_after,
        )
        return Svid(identity, key, chain)

    def verify_leaf(self, cert: x509.Certificate) -> None:
        """Raise CertificateError unless `cert` was signed by this root."""
        try:
            cert.verify_directly_issued_by(self.root)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise CertificateError(f"certificate not issued by this CA: {exc}") from None
