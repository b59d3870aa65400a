"""Node readiness checks for the eBPF redirect: each names what is missing and the fix."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bpf.mounts import (
    BPFFS_ROOT,
    MountUnavailable,
    cgroup2_root,
    covering,
    ensure_bpffs,
    ensure_cgroup2,
)


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
# The rest is older: getsockopt programs 5.3, getpeername4 5.8, netns cookie in connect4 5.7;
# connect4's policy and drop records: socket lookup from sock_addr programs 5.2, the current
# cgroup id there 5.7, ring buffers and the boot clock 5.8, LPM tries long before.
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
    root = cgroup2_root()
    return Check(
        "cgroup v2", root is not None, root or "not mounted",
        "meshctl doctor --fix (mounts cgroup2 where this host's layout puts it)",
    )  # fmt: skip


def _btf() -> Check:
    ok = os.path.exists("/sys/kernel/btf/vmlinux")
    return Check("BTF", ok, "", "boot a kernel built with CONFIG_DEBUG_INFO_BTF=y", False)


def _headers() -> Check:
    ok = os.path.exists(f"/lib/modules/{os.uname().release}/build")
    fix = "apt-get install -y linux-headers-amd64, then meshctl doctor --fix (links them)"
    return Check("kernel headers for BCC", ok, "", fix)


def _bcc_and_compile() -> Check:
    """Compile with BCC and load every program (without pins or attachments): the verifier of
    *this* kernel is the judge of whether the helpers the programs call are allowed."""
    from bpf.loader import _SRC, BpfUnavailable, import_bcc

    name = "BCC compiles the programs, the kernel's verifier accepts them"
    try:
        bcc = import_bcc()
        text = _SRC.read_text().replace("BPF_TABLE_PINNED(", "BPF_TABLE_PINNED_OFF(")
        text = text.replace(':PIN_ROOT/drop_events"', '"')  # the ring buffer's own pin
        # flags, when given (the LPM trie's BPF_F_NO_PREALLOC), are kept: `+ 0` when not
        text = (
            "#define BPF_TABLE_PINNED_OFF(a, b, c, n, m, p, ...) "
            "BPF_F_TABLE(a, b, c, n, m, __VA_ARGS__ + 0)\n" + text
        )
        b = bcc.BPF(text=text.encode(), cflags=["-DPROXY_PORT=15001", "-DFASTPATH=1"])
    except (BpfUnavailable, Exception) as exc:
        fix = "apt-get install -y python3-bpfcc bpfcc-tools linux-headers-amd64"
        return Check(name, False, str(exc)[:200], fix)
    t, at = bcc.BPFProgType, bcc.BPFAttachType
    programs = (
        (b"connect4", t.CGROUP_SOCK_ADDR, at.CGROUP_INET4_CONNECT),
        (b"getpeername4", t.CGROUP_SOCK_ADDR, at.CGROUP_INET4_GETPEERNAME),
        (b"connect6", t.CGROUP_SOCK_ADDR, at.CGROUP_INET6_CONNECT),
        (b"getpeername6", t.CGROUP_SOCK_ADDR, at.CGROUP_INET6_GETPEERNAME),
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
    m = covering(BPFFS_ROOT)
    ok = m is not None and m.fstype == "bpf" and m.point == BPFFS_ROOT
    detail = "" if ok else "not mounted (ztunnel and the lab mount it when they start)"
    return Check(f"bpffs at {BPFFS_ROOT}", ok, detail, "meshctl doctor --fix", False)


CHECKS: tuple[Callable[[], Check], ...] = (
    _kernel, _cgroup2, _btf, _headers, _bcc_and_compile, _iptables, _bpffs, _ktls,
)  # fmt: skip


def run() -> list[Check]:
    return [c() for c in CHECKS]


# -- fixes: only what is safe on any node (mounts the kernel offers, a symlink, a module) ---


def _version_key(path: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def link_headers(
    release: str | None = None, modules: str = "/lib/modules", src: str = "/usr/src"
) -> list[str]:
    """BCC compiles against /lib/modules/<release>/build. A kernel that ships no headers
    (a cloud or CI kernel) can use Debian's: our programs touch only UAPI structures. The
    headers of this very release win where they exist, else the newest installed."""
    release = release or os.uname().release
    build = Path(modules, release, "build")
    if build.exists():
        return []
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    own = Path(src, f"linux-headers-{release}")
    candidates = [own] if own.is_dir() else []
    candidates += [Path(p) for p in sorted(glob.glob(f"{src}/linux-headers-*-{arch}"),
                                           key=_version_key, reverse=True)]  # fmt: skip
    for hdr in candidates:
        common = Path(str(hdr).removesuffix(f"-{arch}") + "-common")
        if not (hdr / "Makefile").exists():
            continue
        build.parent.mkdir(parents=True, exist_ok=True)
        for name, target in (("build", hdr), ("source", common if common.is_dir() else hdr)):
            link = build.parent / name
            if link.is_symlink() or link.exists():
                link.unlink()  # a dangling link from an older headers package
            link.symlink_to(target)
        return [f"linked {build} -> {hdr}"]
    return []


def _modprobe_tls() -> list[str]:
    if ktls_probe_ok() or shutil.which("modprobe") is None:
        return []
    res = subprocess.run(["modprobe", "tls"], capture_output=True, text=True)
    return ["loaded the tls module (kTLS)"] if res.returncode == 0 and ktls_probe_ok() else []


def ktls_probe_ok() -> bool:
    from mesh import ktls

    return ktls.probe().available


def fix() -> tuple[list[str], list[str]]:
    """Every safe fix doctor knows: (what was done, what could not be done and why)."""
    done: list[str] = []
    failed: list[str] = []
    steps: tuple[Callable[[], list[str]], ...] = (
        lambda: ensure_cgroup2()[1],
        lambda: ensure_bpffs(BPFFS_ROOT),
        link_headers,
        _modprobe_tls,
    )
    for step in steps:
        try:
            done += step()
        except (OSError, MountUnavailable) as exc:
            failed.append(str(exc))
    return done, failed
