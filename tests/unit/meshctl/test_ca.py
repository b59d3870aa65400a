"""`meshctl ca` as an operator uses it: files, modes, and one-line errors for mistakes."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from certs.ca import CertificateAuthority
from meshctl.cli import main


def test_init_issue_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca_dir = str(tmp_path / "ca")
    assert main(["ca", "init", ca_dir, "--trust-domain", "example.org"]) == 0
    ident = "spiffe://example.org/ns/shop/sa/web"
    assert (
        main(["ca", "issue", ca_dir, "--id", ident, "--out", str(tmp_path / "web"), "--ttl", "2h"])
        == 0
    )
    key = tmp_path / "web-key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    leaf = x509.load_pem_x509_certificates((tmp_path / "web-chain.pem").read_bytes())[0]
    CertificateAuthority.load(ca_dir).verify_leaf(leaf)
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert 2 * 3600 <= life.total_seconds() <= 2 * 3600 + 600
    assert main(["ca", "issue-node", ca_dir, "--node", "n1", "--out", str(tmp_path / "n1")]) == 0
    node_leaf = x509.load_pem_x509_certificates((tmp_path / "n1-chain.pem").read_bytes())[0]
    san = node_leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://example.org/node/n1"
    ]
    capsys.readouterr()
    assert main(["ca", "show", ca_dir]) == 0
    assert "trust domain: example.org" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["ca", "issue", "{ca}", "--id", "spiffe://other.org/ns/a/sa/b", "--out", "{o}"],
            "trust domain",
        ),
        (
            [
                "ca",
                "issue",
                "{ca}",
                "--id",
                "spiffe://cluster.local/ns/a/sa/b",
                "--out",
                "{o}",
                "--ttl",
                "soon",
            ],
            "--ttl",
        ),
        (["ca", "init", "{ca}"], "refusing to overwrite"),
        (["ca", "show", "{missing}"], "not a CA directory"),
    ],
)
def test_operator_mistakes_are_one_line_errors(
    tmp_path: Path, argv: list[str], message: str
) -> None:
    ca_dir = tmp_path / "ca"
    CertificateAuthority.init(ca_dir)
    args = [a.format(ca=ca_dir, o=tmp_path / "x", missing=tmp_path / "nope") for a in argv]
    proc = subprocess.run(
        [sys.executable, "-m", "meshctl.cli", *args], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
