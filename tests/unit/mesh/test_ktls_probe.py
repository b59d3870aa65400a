"""The probe and the auto|on|off decision, on whatever kernel runs the tests.

This machine's kernel has no kTLS, so here `auto` must fall back and `on` must refuse; inside
the kTLS guest (tests/ktls) the same probe reports the ciphers."""

from __future__ import annotations

import socket
import struct

import pytest

from mesh import ktls


def test_probe_agrees_with_the_kernel() -> None:
    """Cross-check the probe against an independent attempt at attaching the ULP."""
    srv = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(srv.getsockname())
    b, _ = srv.accept()
    srv.close()
    try:
        a.setsockopt(socket.IPPROTO_TCP, 31, b"tls")
        kernel_has_ulp = True
    except OSError:
        kernel_has_ulp = False
    finally:
        a.close()
        b.close()
    support = ktls.probe()
    if kernel_has_ulp:
        assert support.available, support.reason
        assert "TLS_AES_128_GCM_SHA256" in support.ciphers
    else:
        assert not support.available
        assert "TLS ULP" in support.reason
        assert support.ciphers == ()
    assert ktls.probe() is support  # cached


UNAVAILABLE = ktls.KtlsSupport(False, "kernel has no TLS ULP (test)")
AVAILABLE = ktls.KtlsSupport(True, "", ("TLS_AES_128_GCM_SHA256",))


def test_resolve_modes() -> None:
    assert ktls.resolve("off", AVAILABLE) is False
    assert ktls.resolve("auto", AVAILABLE) is True
    assert ktls.resolve("auto", UNAVAILABLE) is False
    assert ktls.resolve(ktls.KtlsMode.ON, AVAILABLE) is True
    with pytest.raises(ktls.KtlsUnavailableError, match=r"ktls: on.*no TLS ULP"):
        ktls.resolve("on", UNAVAILABLE)


def test_bad_mode_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"ktls: 'maybe' is not one of auto, on, off"):
        ktls.KtlsMode.parse("maybe")
    assert ktls.KtlsMode.parse(" ON ") is ktls.KtlsMode.ON


def test_describe_for_dump_and_doctor() -> None:
    d = ktls.describe("on", UNAVAILABLE)
    assert d["mode"] == "on" and d["enabled"] is False
    assert d["kernel"] == {
        "available": False,
        "reason": "kernel has no TLS ULP (test)",
        "ciphers": [],
        "kernel": "",
    }
    assert ktls.describe("auto", AVAILABLE)["enabled"] is True


@pytest.mark.parametrize(
    ("spec", "size"),
    [(ktls.AES_128_GCM, 40), (ktls.AES_256_GCM, 56), (ktls.CHACHA20_POLY1305, 56)],
)
def test_crypto_info_layout_matches_linux_uapi(spec: ktls.CipherSpec, size: int) -> None:
    """sizeof(struct tls12_crypto_info_*) in include/uapi/linux/tls.h."""
    key = bytes(range(spec.key_size))
    iv = bytes(range(100, 112))
    info = spec.crypto_info(key, iv, 0x0102030405060708)
    assert len(info) == size
    version, cipher = struct.unpack_from("=HH", info)
    assert (version, cipher) == (0x0304, spec.cipher_type)
    # iv (after the salt), key, salt (nonce base's head), rec_seq big-endian
    off = 4
    assert info[off : off + spec.iv_size] == iv[spec.salt_size :]
    off += spec.iv_size
    assert info[off : off + spec.key_size] == key
    off += spec.key_size
    assert info[off : off + spec.salt_size] == iv[: spec.salt_size]
    assert info[-8:] == bytes([1, 2, 3, 4, 5, 6, 7, 8])


def test_crypto_info_rejects_wrong_key_size() -> None:
    with pytest.raises(ValueError, match=r"TLS_AES_128_GCM_SHA256: wrong key/iv length 32/12"):
        ktls.AES_128_GCM.crypto_info(bytes(32), bytes(12), 0)
