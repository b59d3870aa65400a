"""BCC loader for the outbound redirect (connect4/getpeername4 per pod cgroup,
sockops/getsockopt on the cgroup where ztunnel's sockets live)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

DEFAULT_PIN_ROOT = "/sys/fs/bpf/ambientmesh"
DEFAULT_CGROUP_ROOT = "/sys/fs/cgroup/unified"
DEFAULT_EXCLUDED_PORTS = (15000, 15001, 15006, 15008, 15020, 15021)
_SRC = Path(__file__).with_name("redirect.bpf.c")


class BpfUnavailable(RuntimeError):
    """BCC or kernel headers missing: the message carries the fix."""


def import_bcc() -> Any:
    """Import Debian's BCC lazily, so modules that never touch BPF need no BCC."""
    path = "/usr/lib/python3/dist-packages"
    if path not in sys.path:
        sys.path.append(path)
    try:
        import bcc
    except ImportError as exc:
        raise BpfUnavailable(
            f"BCC not importable ({exc}); fix: apt-get install -y python3-bpfcc bpfcc-tools"
        ) from exc
    if not Path(f"/lib/modules/{os.uname().release}/build").exists():
        raise BpfUnavailable(
            "kernel headers for BCC missing; fix: apt-get install -y linux-headers-amd64 "
            "and run scripts/setup.sh (links /lib/modules/$(uname -r)/build)"
        )
    return bcc


def _ensure_bpffs(where: str) -> None:
    """Pins need a bpf filesystem; fresh hosts often have /sys/fs/bpf unmounted."""
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if parts[2] == "bpf" and where.startswith(parts[1]):
                return
    res = subprocess.run(["mount", "-t", "bpf", "bpf", where], capture_output=True, text=True)
    if res.returncode != 0:
        raise BpfUnavailable(
            f"no bpf filesystem at {where} ({res.stderr.strip()}); fix: mount -t bpf bpf {where}"
        )


class BpfRedirector:
    """Node-wide owner of the redirect programs; enrol/unenrol attach per pod cgroup.

    Cgroup attachments (BPF_PROG_ATTACH) outlive this process, which keeps pods
    fail-closed while ztunnel restarts: connects still go to 127.0.0.1:<port>.
    """

    def __init__(
        self,
        pin_root: str = DEFAULT_PIN_ROOT,
        proxy_port: int = 15001,
        inbound_port: int = 15006,
        hbone_port: int = 15008,
        fastpath: bool = False,
        ztunnel_cgroup: str = DEFAULT_CGROUP_ROOT,
        excluded_ports: tuple[int, ...] = DEFAULT_EXCLUDED_PORTS,
    ) -> None:
        self.pin_root = pin_root
        self.proxy_port = proxy_port
        self.inbound_port = inbound_port
        self.hbone_port = hbone_port
        self.fastpath = fastpath
        self.ztunnel_cgroup = ztunnel_cgroup
        self.excluded_ports = excluded_ports
        self._bpf: Any = None
        self._fns: dict[str, Any] = {}

    def _load(self) -> None:
        if self._bpf is not None:
            return
        bcc = import_bcc()
        _ensure_bpffs(os.path.dirname(self.pin_root.rstrip("/")) or "/")
        os.makedirs(self.pin_root, exist_ok=True)
        # BCC wants bytes (str works but warns on every load)
        text = _SRC.read_text().replace("PIN_ROOT", self.pin_root).encode()
        self._bpf = b = bcc.BPF(
            text=text,
            cflags=[f"-DPROXY_PORT={self.proxy_port}", f"-DFASTPATH={int(self.fastpath)}"],
        )
        at = bcc.BPFAttachType
        self._fns = {
            "connect4": b.load_func(
                b"connect4", bcc.BPFProgType.CGROUP_SOCK_ADDR, attach_type=at.CGROUP_INET4_CONNECT
            ),
            "getpeername4": b.load_func(
                b"getpeername4",
                bcc.BPFProgType.CGROUP_SOCK_ADDR,
                attach_type=at.CGROUP_INET4_GETPEERNAME,
            ),
            "sockops": b.load_func(b"sockops", bcc.BPFProgType.SOCK_OPS),
            "getsockopt": b.load_func(
                b"getsockopt", bcc.BPFProgType.CGROUP_SOCKOPT, attach_type=at.CGROUP_GETSOCKOPT
            ),
        }
        if self.fastpath:
            msg = b.load_func(b"sk_msg_fast", bcc.BPFProgType.SK_MSG)
            # BCC's Python tables do not wrap sockhash; take its fd from the module
            from bcc.libbcc import lib  # type: ignore[import-not-found, unused-ignore]

            hash_fd = lib.bpf_table_fd(b.module, b"fastpath")
            bcc.BPF.attach_func(msg, hash_fd, at.SK_MSG_VERDICT)
        ports = b["excluded_ports"]
        for p in self.excluded_ports:
            ports[ports.Key(p)] = ports.Leaf(1)

    def _attach(self, cgroup: str, names: tuple[str, ...], detach: bool = False) -> None:
        bcc = import_bcc()
        at = bcc.BPFAttachType
        kinds = {
            "connect4": at.CGROUP_INET4_CONNECT,
            "getpeername4": at.CGROUP_INET4_GETPEERNAME,
            "sockops": at.CGROUP_SOCK_OPS,
            "getsockopt": at.CGROUP_GETSOCKOPT,
        }
        fd = os.open(cgroup, os.O_RDONLY)
        try:
            for n in names:
                try:
                    if detach:
                        bcc.BPF.detach_func(self._fns[n], fd, kinds[n])
                    else:
                        bcc.BPF.attach_func(self._fns[n], fd, kinds[n])
                except Exception:
                    if not detach:
                        raise
        finally:
            os.close(fd)

    def install(self) -> None:
        self._load()
        self._attach(self.ztunnel_cgroup, ("sockops", "getsockopt"))

    def uninstall(self) -> None:
        self._load()
        self._attach(self.ztunnel_cgroup, ("sockops", "getsockopt"), detach=True)
        shutil.rmtree(self.pin_root, ignore_errors=True)

    def _inbound_rule(self) -> list[str]:
        skip = ",".join(str(p) for p in (self.hbone_port, self.inbound_port, self.proxy_port))
        return [
            "PREROUTING", "-p", "tcp", "!", "-i", "lo", "-m", "multiport", "!", "--dports",
            skip, "-m", "comment", "--comment", "ambientmesh-inbound",
            "-j", "REDIRECT", "--to-ports", str(self.inbound_port),
        ]  # fmt: skip

    def _iptables(self, netns_path: str, op: str) -> int:
        cmd = ["nsenter", f"--net={netns_path}", "iptables", "-w", "-t", "nat", op]
        res = subprocess.run(cmd + self._inbound_rule(), capture_output=True, text=True)
        if res.returncode not in (0, 1):
            raise BpfUnavailable(
                f"iptables in {netns_path} failed: {res.stderr.strip()}; "
                "fix: apt-get install -y iptables"
            )
        return res.returncode

    def enrol(self, cgroup_path: str, netns_path: str) -> None:
        """Attach outbound redirect to the pod cgroup and capture inbound plaintext to 15006."""
        self._load()
        self._attach(cgroup_path, ("connect4", "getpeername4"))
        if self._iptables(netns_path, "-C") != 0 and self._iptables(netns_path, "-A") != 0:
            raise BpfUnavailable(f"iptables could not add the inbound rule in {netns_path}")

    def unenrol(self, cgroup_path: str, netns_path: str) -> None:
        self._load()
        self._attach(cgroup_path, ("connect4", "getpeername4"), detach=True)
        if os.path.exists(netns_path):
            while self._iptables(netns_path, "-C") == 0:
                self._iptables(netns_path, "-D")
