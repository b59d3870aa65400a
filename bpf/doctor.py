"""Node readiness checks for the eBPF redirect: each names what is missing and the fix."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str
    required: bool = True


def _kernel() -> Check:
    rel = os.uname().release
    major, minor = (int(x) for x in rel.split(".")[:2])
    return Check("kernel >= 5.15", (major, minor) >= (5, 15), rel, "boot a kernel >= 5.15")


def _cgroup2() -> Check:
    ok = os.path.exists("/sys/fs/cgroup/unified/cgroup.procs") or os.path.exists(
        "/sys/fs/cgroup/cgroup.controllers"
    )
    return Check("cgroup v2", ok, "", "mount -t cgroup2 none /sys/fs/cgroup/unified")


def _btf() -> Check:
    ok = os.path.exists("/sys/kernel/btf/vmlinux")
    return Check("BTF", ok, "", "boot a kernel built with CONFIG_DEBUG_INFO_BTF=y", False)


def _headers() -> Check:
    ok = os.path.exists(f"/lib/modules/{os.uname().release}/build")
    return Check("kernel headers for BCC", ok, "", "scripts/setup.sh (links Debian headers)")


def _bcc_and_compile() -> Check:
    from bpf.loader import _SRC, BpfUnavailable, import_bcc

    try:
        bcc = import_bcc()
        text = _SRC.read_text().replace("BPF_TABLE_PINNED(", "BPF_TABLE_PINNED_OFF(")
        text = "#define BPF_TABLE_PINNED_OFF(a, b, c, n, m, p) BPF_TABLE(a, b, c, n, m)\n" + text
        bcc.BPF(text=text.encode(), cflags=["-DPROXY_PORT=15001", "-DFASTPATH=1"])
    except (BpfUnavailable, Exception) as exc:
        fix = "apt-get install -y python3-bpfcc bpfcc-tools linux-headers-amd64"
        return Check("BCC importable, programs compile", False, str(exc)[:200], fix)
    return Check("BCC importable, programs compile", True, "", "")


def _iptables() -> Check:
    ok = shutil.which("iptables") is not None and shutil.which("nsenter") is not None
    return Check("iptables + nsenter", ok, "", "apt-get install -y iptables util-linux")


def _ktls() -> Check:
    from mesh import ktls  # the same probe ztunnel's `--ktls auto` decides with

    support = ktls.probe()
    detail = ", ".join(support.ciphers) if support.available else support.reason
    fix = "modprobe tls (user-space TLS otherwise)"
    return Check("kTLS", support.available, detail, fix, False)


def _bpffs() -> Check:
    with open("/proc/mounts") as f:
        ok = any(line.split()[2] == "bpf" for line in f)
    return Check("bpffs mounted", ok, "", "mount -t bpf bpf /sys/fs/bpf", False)


CHECKS: tuple[Callable[[], Check], ...] = (
    _kernel, _cgroup2, _btf, _headers, _bcc_and_compile, _iptables, _bpffs, _ktls,
)  # fmt: skip


def run() -> list[Check]:
    return [c() for c in CHECKS]
