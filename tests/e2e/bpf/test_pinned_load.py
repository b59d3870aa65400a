"""ztunnel's way of loading: a child process compiles and pins, ztunnel attaches the pinned
programs with bpf(2) and never imports BCC (whose LLVM would stay in its memory for good).
Real cgroup, netns and BPF (root only)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.e2e.bpf.test_redirect import CLIENT, SERVER

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for netns/cgroup/BPF")

ROOT = Path(__file__).resolve().parents[3]
ZTUNNEL_SIDE = textwrap.dedent(
    """
    import sys
    from ztunnel.inpod.redirect import NodeRedirector
    node, pins, own_cg, pod_cg, netns = sys.argv[1:6]
    r = NodeRedirector(node, pins, own_cg)
    r.install()
    r.enrol(pod_cg, netns)
    rss = [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmRSS")][0]
    print("bcc" in sys.modules, int(rss) // 1024, flush=True)
    """
)


def test_ztunnel_attaches_pinned_programs_without_bcc(tmp_path: Path) -> None:
    from bpf import syscall
    from bpf.loader import BpfRedirector, import_bcc

    sfx = secrets.token_hex(2)
    ns = f"am-{sfx}-pin"
    pod_cg = f"/sys/fs/cgroup/unified/ambientmesh-test-{sfx}-pod"
    zt_cg = f"/sys/fs/cgroup/unified/ambientmesh-test-{sfx}-zt"
    pins = f"/sys/fs/bpf/ambientmesh-test-{sfx}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    os.mkdir(pod_cg)
    os.mkdir(zt_cg)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", "10.77.0.2/32", "dev", "lo"], check=True)
        out = subprocess.run(
            [sys.executable, "-c", ZTUNNEL_SIDE, "n1", pins, zt_cg, pod_cg, f"/run/netns/{ns}"],
            env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        bcc_loaded, rss_mib = out.stdout.split()
        assert bcc_loaded == "False"
        print(f"ztunnel-side RSS after install + enrol: {rss_mib} MiB")
        # the attachments outlived that process: the pod's connects are redirected
        # getsockopt is attached to ztunnel's cgroup: the stand-in for ztunnel's listener
        # must be created there (a socket belongs to the cgroup it was created in)
        srv = subprocess.Popen(
            ["sh", "-c", f'echo $$ > {zt_cg}/cgroup.procs && exec "$@"', "sh",
             "nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c", SERVER],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
            cli = subprocess.run(
                ["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c", CLIENT, pod_cg],
                capture_output=True, text=True, timeout=10,
            )  # fmt: skip
            assert cli.returncode == 0, cli.stderr
            assert cli.stdout.split() == ["10.77.0.2", "80"]
            assert srv.communicate(timeout=10)[0].split()[:2] == ["10.77.0.2", "80"]
        finally:
            srv.kill()
            srv.wait()
        import_bcc()  # the constants we pass to bpf(2) are the kernel's, as BCC knows them
        import bcc

        at = bcc.BPFAttachType
        assert syscall.ATTACH_TYPES == {
            "connect4": at.CGROUP_INET4_CONNECT, "getpeername4": at.CGROUP_INET4_GETPEERNAME,
            "connect6": at.CGROUP_INET6_CONNECT, "getpeername6": at.CGROUP_INET6_GETPEERNAME,
            "sockops": at.CGROUP_SOCK_OPS, "getsockopt": at.CGROUP_GETSOCKOPT,
        }  # fmt: skip
    finally:
        r = BpfRedirector(pin_root=os.path.join(pins, "n1"), ztunnel_cgroup=zt_cg)
        if os.path.exists(r.pin_root):
            r.open_pinned()
            r.unenrol(pod_cg)
            r.uninstall()
        shutil.rmtree(pins, ignore_errors=True)
        for cg in (pod_cg, zt_cg):
            os.rmdir(cg)
        subprocess.run(["ip", "netns", "del", ns], check=False)
