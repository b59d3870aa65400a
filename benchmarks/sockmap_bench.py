"""Bulk app -> 127.0.0.1:15001 transfer in an enrolled pod, with and without the sockmap
fast path, in one run; prints MB/s and the ratio. Root only. Not a test: no thresholds."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time

from bpf.loader import BpfRedirector

SINK = textwrap.dedent(
    """
    import socket
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("127.0.0.1", 15001)); l.listen(); print("ready", flush=True)
    c, _ = l.accept(); buf = bytearray(1 << 20); n = 0
    while True:
        k = c.recv_into(buf)
        if not k: break
        n += k
    print(n)
    """
)
SRC = textwrap.dedent(
    """
    import os, socket, sys, time
    open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
    s = socket.create_connection(("10.77.0.2", 80)); blob = os.urandom(1 << 20)
    t = time.perf_counter()
    for _ in range(int(sys.argv[2])): s.sendall(blob)
    s.shutdown(socket.SHUT_WR); s.recv(1); print(time.perf_counter() - t)
    """
)


def run_once(fastpath: bool, mib: int) -> float:
    sfx = secrets.token_hex(2)
    ns, cg = f"am-{sfx}-bn", f"/sys/fs/cgroup/unified/ambientmesh-test-{sfx}"
    pins = f"/sys/fs/bpf/ambientmesh-test-{sfx}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    os.mkdir(cg)
    r = BpfRedirector(pin_root=pins, fastpath=fastpath)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", "10.77.0.2/32", "dev", "lo"], check=True)
        r.install()
        r.attach(cg, ("connect4", "getpeername4"))  # outbound only; no inbound capture needed
        enter = ["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c"]
        sink = subprocess.Popen([*enter, SINK], stdout=subprocess.PIPE, text=True)
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        t0 = time.perf_counter()
        out = subprocess.run([*enter, SRC, cg, str(mib)], capture_output=True, text=True)
        sink.wait(timeout=60)
        secs = time.perf_counter() - t0 if out.returncode else float(out.stdout)
        return mib / secs
    finally:
        try:
            r.detach(cg, ("connect4", "getpeername4"))
            r.uninstall()
        finally:
            os.rmdir(cg)
            subprocess.run(["ip", "netns", "del", ns], check=False)
            shutil.rmtree(pins, ignore_errors=True)


def main() -> None:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    base = run_once(False, mib)
    fast = run_once(True, mib)
    print(f"tcp loopback: {base:8.1f} MiB/s")
    print(f"sockmap:      {fast:8.1f} MiB/s")
    print(f"ratio sockmap/tcp: {fast / base:.2f}")


if __name__ == "__main__":
    main()
