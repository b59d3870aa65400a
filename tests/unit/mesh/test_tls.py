"""Real TLS 1.3 handshakes between mesh contexts over a loopback socket pair."""

from __future__ import annotations

import socket
import ssl
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from certs.ca import CertificateAuthority
from mesh.identity.svid import Svid
from mesh.tls import PeerIdentityError, check_peer, client_context, server_context

SERVER = "spiffe://cluster.local/ns/shop/sa/web"
CLIENT = "spiffe://cluster.local/ns/shop/sa/frontend"


def handshake(
    server: ssl.SSLContext, client: ssl.SSLContext
) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    a, b = socket.socketpair()
    result: dict[str, object] = {}

    def serve() -> None:
        try:
            result["s"] = server.wrap_socket(a, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            result["err"] = exc
            a.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        c = client.wrap_socket(b)
        c.sendall(b"ping")  # TLS 1.3: a refused client cert surfaces on first I/O
    finally:
        t.join(5)
    if "err" in result:
        raise result["err"]  # type: ignore[misc]
    s = result["s"]
    assert isinstance(s, ssl.SSLSocket)
    assert s.recv(4) == b"ping"
    return s, c


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca")


def test_mutual_handshake_sees_each_others_spiffe_ids(ca: CertificateAuthority) -> None:
    s, c = handshake(
        server_context(ca.issue(SERVER), ca.bundle_pem),
        client_context(ca.issue(CLIENT), ca.bundle_pem),
    )
    assert c.version() == "TLSv1.3" and c.selected_alpn_protocol() == "h2"
    assert check_peer(s, {CLIENT}, "cluster.local") == CLIENT
    assert check_peer(c, None, "cluster.local") == SERVER
    with pytest.raises(PeerIdentityError, match="not the expected"):
        check_peer(c, {"spiffe://cluster.local/ns/shop/sa/other"}, "cluster.local")
    with pytest.raises(PeerIdentityError, match="trust domain"):
        check_peer(c, None, "example.org")


def test_expired_client_certificate_is_refused(ca: CertificateAuthority) -> None:
    now = datetime.now(UTC)
    old = ca.issue(CLIENT, not_before=now - timedelta(days=2), not_after=now - timedelta(days=1))
    with pytest.raises((ssl.SSLError, OSError)):
        handshake(
            server_context(ca.issue(SERVER), ca.bundle_pem), client_context(old, ca.bundle_pem)
        )


def test_certificate_from_another_ca_is_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    rogue = CertificateAuthority.init(tmp_path / "rogue")
    forged: Svid = rogue.issue(CLIENT)  # same identity, wrong issuer
    with pytest.raises((ssl.SSLError, OSError)):
        handshake(
            server_context(ca.issue(SERVER), ca.bundle_pem),
            client_context(forged, rogue.bundle_pem + ca.bundle_pem),
        )


def test_server_sends_no_session_tickets(ca: CertificateAuthority) -> None:
    ctx = server_context(ca.issue(SERVER), ca.bundle_pem)
    assert ctx.num_tickets == 0
