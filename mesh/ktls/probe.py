"""Does this kernel do kTLS at all, and what did the operator ask for (`auto | on | off`)?
Separate from the handshake so `meshctl doctor` and the flag check need none of it."""

from __future__ import annotations

import enum
import errno
import functools
import os
import socket
from dataclasses import dataclass

from mesh.ktls.abi import CIPHERS, SOL_TLS, TCP_ULP, TLS_RX, TLS_TX, CipherSpec

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
