"""Node readiness checks for the eBPF redirect: each names what is missing and the fix."""

from __future__ import annotations

import os
import re
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


# The newest kernel feature the programs use decides the minimum: the redirect state is keyed
# by the netns cookie (two pods of a node both reach their in-pod 15001 from 127.0.0.1 and can
# hold the same client port), and the sk_msg fast path asks for it too, which arrived in 5.15.
# The rest is older: getsockopt programs 5.3, getpeername4 5.8, netns cookie in connect4 5.7.
MIN_KERNEL = (5, 15)
MIN_KERNEL_WHY = "bpf_get_netns_cookie in sock_ops and sk_msg programs"


def parse_release(rel: str) -> tuple[int, int]:
    """(major, minor) of a `uname -r` string; suffixes like `-fc-v595` or `+` are ignored."""
    m = re.match(r"(\d+)\.(\d+)", rel)
    if m is None:
        raise ValueError(f"kernel release {rel!r} does not start with MAJOR.MINOR")
    return int(m.group(1)), int(m.group(2))


def _kernel(release: str | None = None) -> Check:
    rel = release or os.uname().release
    want = ".".join(str(x) for x in MIN_KERNEL)
    name = f"kernel >= {want} ({MIN_KERNEL_WHY})"
    try:
        ok = parse_release(rel) >= MIN_KERNEL
    except ValueError as exc:
        return Check(name, False, str(exc), f"boot a Linux kernel >= {want}")
    return Check(name, ok, rel, f"boot a Linux kernel >= {want}")


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
    """Compile with BCC and load every program (without pins or attachments): the verifier of
    *this* kernel is the judge of whether the helpers the programs call are allowed."""
    from bpf.loader import _SRC, BpfUnavailable, import_bcc

    name = "BCC compiles the programs, the kernel's verifier accepts them"
    try:
        bcc = import_bcc()
        text = _SRC.read_text().replace("BPF_TABLE_PINNED(", "BPF_TABLE_PINNED_OFF(")
        text = "#define BPF_TABLE_PINNED_OFF(a, b, c, n, m, p) BPF_TABLE(a, b, c, n, m)\n" + text
        b = bcc.BPF(text=text.encode(), cflags=["-DPROXY_PORT=15001", "-DFASTPATH=1"])
    except (BpfUnavailable, Exception) as exc:
        fix = "apt-get install -y python3-bpfcc bpfcc-tools linux-headers-amd64"
        return Check(name, False, str(exc)[:200], fix)
    t, at = bcc.BPFProgType, bcc.BPFAttachType
    programs = (
        (b"connect4", t.CGROUP_SOCK_ADDR, at.CGROUP_INET4_CONNECT),
        (b"getpeername4", t.CGROUP_SOCK_ADDR, at.CGROUP_INET4_GETPEERNAME),
        (b"sockops", t.SOCK_OPS, -1),
        (b"getsockopt", t.CGROUP_SOCKOPT, at.CGROUP_GETSOCKOPT),
        (b"sk_msg_fast", t.SK_MSG, -1),
    )
    try:
        for fn, prog_type, attach in programs:
            b.load_func(fn, prog_type, attach_type=attach)
    except Exception as exc:
        want = ".".join(str(x) for x in MIN_KERNEL)
        detail = f"{fn.decode()}: {str(exc).strip().splitlines()[-1][:200]}"
        return Check(name, False, detail, f"boot a Linux kernel >= {want} ({MIN_KERNEL_WHY})")
    finally:
        b.cleanup()
    return Check(name, True, "", "")


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
