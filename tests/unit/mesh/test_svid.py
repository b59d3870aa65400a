from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh.identity.svid import Svid


def test_svid_accessors() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    nb = datetime(2026, 1, 1, tzinfo=UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(42)
        .not_valid_before(nb)
        .not_valid_after(nb + timedelta(hours=24))
        .sign(key, hashes.SHA256())
    )
    s = Svid("spiffe://cluster.local/ns/a/sa/b", key, (cert,))
    assert s.serial == 42
    assert s.refresh_at == nb + timedelta(hours=12)
    assert not s.expired(nb + timedelta(hours=23)) and s.expired(nb + timedelta(hours=24))
    assert s.key_pem().startswith(b"-----BEGIN PRIVATE KEY")
    assert x509.load_pem_x509_certificates(s.chain_pem()) == [cert]
    assert len(s.fingerprint) == 64
