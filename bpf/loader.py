"""BCC loader for the outbound redirect (connect4/getpeername4 per pod cgroup,
sockops/getsockopt on the cgroup where ztunnel's sockets live).

Two ways to use it. In one process (tests, tools): `install()` compiles with BCC and attaches.
For ztunnel: `python -m bpf.loader load --pin-root DIR` compiles, loads and pins programs and
maps, then exits, taking LLVM's memory with it; ztunnel then `open_pinned()`s the programs and
attaches them with plain bpf(2) calls (`bpf.syscall`), never importing BCC.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from bpf import syscall
from bpf.mounts import BPFFS_ROOT, MountUnavailable, default_cgroup_root, ensure_bpffs
from mesh.ports import OUTBOUND_PORT, PROXY_PORTS
from mesh.process import EnvironmentUnfit

DEFAULT_PIN_ROOT = f"{BPFFS_ROOT}/ambientmesh"
DEFAULT_EXCLUDED_PORTS = PROXY_PORTS
_SRC = Path(__file__).with_name("redirect.bpf.c")


class BpfUnavailable(EnvironmentUnfit):
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


# The attach map: which programs go on which cgroup. Only this module attaches or detaches.
NODE_PROGRAMS = ("sockops", "getsockopt")  # ztunnel's own cgroup (its accepted sockets)
# each enrolled pod's cgroup; the "6" pair catches IPv4 reached through dual-stack sockets
POD_PROGRAMS = ("connect4", "getpeername4", "connect6", "getpeername6", "sockops")


class BpfRedirector:
    """Node-wide owner of the redirect programs; enrol/unenrol attach per pod cgroup.

    Cgroup attachments (BPF_PROG_ATTACH) outlive this process, which keeps pods
    fail-closed while ztunnel restarts: connects still go to 127.0.0.1:<port>.
    """

    def __init__(
        self,
        pin_root: str = DEFAULT_PIN_ROOT,
        proxy_port: int = OUTBOUND_PORT,
        fastpath: bool = False,
        ztunnel_cgroup: str | None = None,
        excluded_ports: tuple[int, ...] = DEFAULT_EXCLUDED_PORTS,
        enforce: bool = True,
    ) -> None:
        self.pin_root = pin_root
        self.proxy_port = proxy_port
        self.fastpath = fastpath
        self.ztunnel_cgroup = ztunnel_cgroup or default_cgroup_root()
        self.excluded_ports = excluded_ports
        # False: redirect only, no policy or listener check (the cost benchmark's baseline)
        self.enforce = enforce
        self._bpf: Any = None
        self._fns: dict[str, int] = {}  # program name -> fd
        self.mount_actions: list[str] = []  # what had to be mounted first, for the log

    PROGRAMS = ("connect4", "getpeername4", "connect6", "getpeername6", "sockops", "getsockopt")

    def _prog_pin(self, name: str) -> str:
        return os.path.join(self.pin_root, f"prog_{name}")

    def pin_programs(self) -> None:
        """Pin the loaded programs beside the maps, replacing older pins (a new version)."""
        self._load()
        for name, fd in self._fns.items():
            path = self._prog_pin(name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            syscall.obj_pin(fd, path)

    def open_pinned(self) -> None:
        """Use programs a loader process pinned, without BCC (see the module docstring)."""
        if self._fns:
            return
        fns = {}
        try:
            for name in self.PROGRAMS:
                fns[name] = syscall.obj_get(self._prog_pin(name))
        except OSError as exc:
            for fd in fns.values():
                os.close(fd)
            raise BpfUnavailable(
                f"redirect programs not pinned under {self.pin_root} ({exc.strerror}); "
                f"fix: python -m bpf.loader load --pin-root {self.pin_root}"
            ) from None
        self._fns = fns

    def close(self) -> None:
        """Close the program fds `open_pinned` opened (attachments and pins stay). Fds of
        programs BCC loaded in this process belong to BCC."""
        if self._bpf is None:
            for fd in self._fns.values():
                os.close(fd)
        self._fns = {}

    def _load(self) -> None:
        if self._fns:
            return
        bcc = import_bcc()
        self.mount_actions += ensure_bpffs(self.pin_root)
        # BCC wants bytes (str works but warns on every load)
        text = _SRC.read_text().replace("PIN_ROOT", self.pin_root).encode()
        self._bpf = b = bcc.BPF(
            text=text,
            cflags=[
                f"-DPROXY_PORT={self.proxy_port}",
                f"-DFASTPATH={int(self.fastpath)}",
                f"-DENFORCE={int(self.enforce)}",
            ],
        )
        at = bcc.BPFAttachType
        fns = {
            "connect4": b.load_func(
                b"connect4", bcc.BPFProgType.CGROUP_SOCK_ADDR, attach_type=at.CGROUP_INET4_CONNECT
            ),
            "getpeername4": b.load_func(
                b"getpeername4",
                bcc.BPFProgType.CGROUP_SOCK_ADDR,
                attach_type=at.CGROUP_INET4_GETPEERNAME,
            ),
            "connect6": b.load_func(
                b"connect6", bcc.BPFProgType.CGROUP_SOCK_ADDR, attach_type=at.CGROUP_INET6_CONNECT
            ),
            "getpeername6": b.load_func(
                b"getpeername6",
                bcc.BPFProgType.CGROUP_SOCK_ADDR,
                attach_type=at.CGROUP_INET6_GETPEERNAME,
            ),
            "sockops": b.load_func(b"sockops", bcc.BPFProgType.SOCK_OPS),
            "getsockopt": b.load_func(
                b"getsockopt", bcc.BPFProgType.CGROUP_SOCKOPT, attach_type=at.CGROUP_GETSOCKOPT
            ),
        }
        self._fns = {name: int(fn.fd) for name, fn in fns.items()}
        if self.fastpath:
            msg = b.load_func(b"sk_msg_fast", bcc.BPFProgType.SK_MSG)
            # BCC's Python tables do not wrap sockhash; take its fd from the module
            from bcc.libbcc import lib  # type: ignore[import-not-found, unused-ignore]

            hash_fd = lib.bpf_table_fd(b.module, b"fastpath")
            bcc.BPF.attach_func(msg, hash_fd, at.SK_MSG_VERDICT)
        ports = b[b"excluded_ports"]
        for p in self.excluded_ports:
            ports[ports.Key(p)] = ports.Leaf(1)

    def attach(self, cgroup: str, names: tuple[str, ...]) -> None:
        """Attach the named programs (loaded or opened) to `cgroup`."""
        self._on_cgroup(cgroup, names, syscall.prog_attach, tolerate=False)

    def detach(self, cgroup: str, names: tuple[str, ...]) -> None:
        """Detach the named programs from `cgroup`; what is not attached is skipped."""
        self._on_cgroup(cgroup, names, syscall.prog_detach, tolerate=True)

    def _on_cgroup(self, cgroup: str, names: tuple[str, ...], op: Any, *, tolerate: bool) -> None:
        fd = os.open(cgroup, os.O_RDONLY)
        try:
            for n in names:
                try:
                    op(self._fns[n], fd, syscall.ATTACH_TYPES[n])
                except OSError:
                    if not tolerate:
                        raise
        finally:
            os.close(fd)

    def attach_node(self) -> None:
        """The node's half: SO_ORIGINAL_DST and sockops on ztunnel's own cgroup."""
        self.attach(self.ztunnel_cgroup, NODE_PROGRAMS)

    def install(self) -> None:
        self._load()
        self.attach_node()

    def uninstall(self) -> None:
        if not self._fns and os.path.exists(self._prog_pin("getsockopt")):
            self.open_pinned()
        if self._fns:
            self.detach(self.ztunnel_cgroup, NODE_PROGRAMS)
        shutil.rmtree(self.pin_root, ignore_errors=True)
        if self._bpf is None:
            self.close()

    def enrol(self, cgroup_path: str) -> None:
        """Attach the outbound redirect (and sockops) to one pod's cgroup. Inbound capture
        is not BPF's: ztunnel's in-pod capture adds that rule (`ztunnel.inpod.capture`)."""
        self._load()
        self.attach(cgroup_path, POD_PROGRAMS)

    def unenrol(self, cgroup_path: str) -> None:
        self._load()
        self.detach(cgroup_path, POD_PROGRAMS)


def main(argv: list[str] | None = None) -> int:
    """`python -m bpf.loader load`: compile, load and pin, then exit (ztunnel attaches)."""
    p = argparse.ArgumentParser(prog="python -m bpf.loader")
    sub = p.add_subparsers(dest="cmd", required=True)
    ld = sub.add_parser("load", help="compile, load and pin the programs and maps")
    ld.add_argument("--pin-root", default=DEFAULT_PIN_ROOT)
    ld.add_argument("--proxy-port", type=int, default=OUTBOUND_PORT)
    ld.add_argument("--fastpath", action="store_true", help="sk_msg/sockhash between local sockets")
    args = p.parse_args(argv)
    r = BpfRedirector(pin_root=args.pin_root, proxy_port=args.proxy_port, fastpath=args.fastpath)
    try:
        r.pin_programs()
        for what in r.mount_actions:
            print(f"bpf.loader: {what}", file=sys.stderr)
    except (BpfUnavailable, MountUnavailable, OSError) as exc:
        print(f"bpf.loader: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
