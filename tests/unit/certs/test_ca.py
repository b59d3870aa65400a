"""The CA signs only what a mesh peer will accept, and never loses or leaks its root."""

from __future__ import annotations

import stat
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs.ca import CaExistsError, CertificateAuthority
from mesh.identity.svid import CertificateError

ID = "spiffe://cluster.local/ns/shop/sa/web"


def csr(*sans: x509.GeneralName) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=True)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_init_writes_key_0600_and_refuses_overwrite(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    mode = stat.S_IMODE((tmp_path / "ca" / "root-key.pem").stat().st_mode)
    assert mode == 0o600
    with pytest.raises(CaExistsError, match="refusing to overwrite"):
        CertificateAuthority.init(tmp_path / "ca")
    again = CertificateAuthority.load(tmp_path / "ca")
    assert again.bundle_pem == ca.bundle_pem
    assert again.trust_domain == "cluster.local"


def test_signed_leaf_has_one_spiffe_san_and_both_usages(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path)
    (leaf,) = ca.sign_csr(csr(x509.UniformResourceIdentifier(ID)))
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [ID]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert timedelta(hours=24) <= life <= timedelta(hours=24, minutes=6)
    ca.verify_leaf(leaf)


@pytest.mark.parametrize(
    ("sans", "message"),
    [
        ((), "no subjectAltName"),
        ((x509.UniformResourceIdentifier(ID), x509.DNSName("web.shop")), "exactly one URI SAN"),
        ((x509.UniformResourceIdentifier("spiffe://evil.org/ns/a/sa/b"),), "trust domain"),
        ((x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a"),), "not a workload"),
        ((x509.UniformResourceIdentifier("spiffe://cluster.local/ns/../sa/b"),), "segment"),
        ((x509.UniformResourceIdentifier("https://cluster.local/ns/a/sa/b"),), "scheme"),
    ],
)
def test_refuses_bad_csrs(tmp_path: Path, sans: tuple[x509.GeneralName, ...], message: str) -> None:
    ca = CertificateAuthority.init(tmp_path)
    with pytest.raises(CertificateError, match=message):
        ca.sign_csr(csr(*sans))


def test_allowed_ids_restrict_what_a_caller_gets(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path)
    other = "spiffe://cluster.local/ns/shop/sa/db"
    with pytest.raises(CertificateError, match="not allowed"):
        ca.sign_csr(csr(x509.UniformResourceIdentifier(other)), allowed_ids={ID})
    assert ca.sign_csr(csr(x509.UniformResourceIdentifier(ID)), allowed_ids={ID})


def test_foreign_ca_leaf_fails_verification(tmp_path: Path) -> None:
    ours = CertificateAuthority.init(tmp_path / "a")
    theirs = CertificateAuthority.init(tmp_path / "b")
    with pytest.raises(CertificateError, match="not issued by this CA"):
        ours.verify_leaf(theirs.issue(ID).leaf)


def test_load_of_a_non_ca_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="not a CA directory"):
        CertificateAuthority.load(tmp_path)
