"""Real netns + cgroup + BPF: outbound redirect and SO_ORIGINAL_DST (root only).

Wired as ztunnel.inpod.redirect wires a node: connect4/getpeername4/sockops on the pod's cgroup,
getsockopt/sockops on a cgroup of the proxy's own, in which the proxy's stand-in creates its
listener. Nothing is attached to the machine's root cgroup (it would catch every process, and
another test attaching there at the same time would replace our programs)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from bpf.loader import BpfRedirector
from ztunnel.inpod.capture import add_inbound_capture, remove_inbound_capture

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for netns/cgroup/BPF")

CLIENT = textwrap.dedent(
    """
    import os, socket, sys
    open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
    s = socket.create_connection(("10.77.0.2", 80), timeout=5)
    print(s.getpeername()[0], s.getpeername()[1]); s.sendall(b"hi"); s.close()
    """
)
# A dual-stack client (AF_INET6, IPV6_V6ONLY off) reaching an IPv4 address, as gRPC and Java
# connect to every IPv4 address: the kernel runs connect6, not connect4, for it.
DUALSTACK_CLIENT = textwrap.dedent(
    """
    import os, socket, sys
    open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.settimeout(5)
    try:
        s.connect(("::ffff:10.77.0.2", 80))
    except PermissionError:
        print("eperm"); sys.exit(0)
    except ConnectionRefusedError:
        print("refused"); sys.exit(0)
    print(s.getpeername()[0], s.getpeername()[1]); s.sendall(b"hi"); s.close()
    """
)
SERVER = textwrap.dedent(
    """
    import socket, struct
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("127.0.0.1", 15001)); l.listen(); print("ready", flush=True)
    c, _ = l.accept(); raw = c.getsockopt(socket.SOL_IP, 80, 16)
    port, = struct.unpack("!H", raw[2:4]); print(socket.inet_ntoa(raw[4:8]), port, c.recv(10))
    """
)


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[tuple[str, str, BpfRedirector]]:
    sfx = secrets.token_hex(2)
    ns = f"am-{sfx}-pod"
    root = f"/sys/fs/cgroup/unified/ambientmesh-test-{sfx}"
    cg, proxy_cg = f"{root}/pod", f"{root}/ztunnel"
    pins = f"/sys/fs/bpf/ambientmesh-test-{sfx}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    for d in (root, cg, proxy_cg):
        os.mkdir(d)
    r = BpfRedirector(
        pin_root=pins, fastpath=getattr(request, "param", False), ztunnel_cgroup=proxy_cg
    )
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", "10.77.0.2/32", "dev", "lo"], check=True)
        r.install()
        r.enrol(cg)
        add_inbound_capture(f"/run/netns/{ns}")
        yield ns, cg, r
    finally:
        try:
            r.unenrol(cg)
            remove_inbound_capture(f"/run/netns/{ns}")
            r.uninstall()
        finally:
            for d in (cg, proxy_cg, root):
                os.rmdir(d)
        subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(pins, ignore_errors=True)


def as_proxy(r: BpfRedirector, ns: str, script: str) -> list[str]:
    """argv running `script` in the pod's netns from the proxy's cgroup (a socket belongs to
    the cgroup it was created in: that is where getsockopt must find the listener's)."""
    return ["sh", "-c", f'echo $$ > {r.ztunnel_cgroup}/cgroup.procs && exec "$@"', "sh",
            "nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c", script]  # fmt: skip


def test_connect_redirected_and_original_dst(lab: tuple[str, str, BpfRedirector]) -> None:
    ns, cg, r = lab
    srv = subprocess.Popen(
        as_proxy(r, ns, SERVER),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        cli = subprocess.run(
            ["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c", CLIENT, cg],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert cli.returncode == 0, cli.stderr
        assert cli.stdout.split() == ["10.77.0.2", "80"]
        out, _ = srv.communicate(timeout=10)
        assert out.split()[:2] == ["10.77.0.2", "80"]
        assert "b'hi'" in out
    finally:
        srv.kill()
        srv.wait()


def test_dualstack_connect_to_ipv4_is_redirected_too(lab: tuple[str, str, BpfRedirector]) -> None:
    """Without connect6 this connect went straight to 10.77.0.2:80, past the mesh."""
    ns, cg, r = lab
    srv = _listen(ns, r)
    try:
        cli = subprocess.run(
            ["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c", DUALSTACK_CLIENT, cg],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        assert cli.stdout.split() == ["::ffff:10.77.0.2", "80"]  # getpeername6: the original
        out, _ = srv.communicate(timeout=10)
        assert out.split()[:2] == ["10.77.0.2", "80"] and "b'hi'" in out
    finally:
        srv.kill()
        srv.wait()


def test_dualstack_connect_fails_closed_without_listener(
    lab: tuple[str, str, BpfRedirector],
) -> None:
    ns, cg, _ = lab
    real = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c",
         "import socket\nl=socket.create_server(('10.77.0.2',80))\nprint('ready',flush=True)\n"
         "import time\ntime.sleep(30)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert real.stdout is not None and real.stdout.readline().strip() == "ready"
        cli = subprocess.run(
            ["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c", DUALSTACK_CLIENT, cg],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        # refused by connect6 itself, like connect4 (EPERM, a recorded drop): the v4-mapped
        # socket neither reaches the real server nor waits for a listener
        assert cli.stdout.strip() == "eperm", cli.stdout + cli.stderr
    finally:
        real.kill()
        real.wait()


REFUSED_CLIENT = textwrap.dedent(
    """
    import os, socket, sys
    if sys.argv[1] != "-":
        open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
    try:
        socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=3)
        print("connected")
    except ConnectionRefusedError:
        print("refused")
    except PermissionError:
        print("eperm")
    """
)


def _run(ns: str, *args: str) -> str:
    res = subprocess.run(
        ["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c", REFUSED_CLIENT, *args],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def _listen(ns: str, r: BpfRedirector) -> subprocess.Popen[str]:
    srv = subprocess.Popen(
        as_proxy(r, ns, SERVER),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
    return srv


@pytest.mark.parametrize(
    ("cgroup", "dst", "port"),
    [
        ("-", "10.77.0.2", "80"),  # not in the enrolled cgroup
        ("cg", "127.0.0.1", "80"),  # loopback-to-self
        ("cg", "10.77.0.2", "15008"),  # excluded port
    ],
)
def test_not_redirected(
    lab: tuple[str, str, BpfRedirector], cgroup: str, dst: str, port: str
) -> None:
    """With a listener on 15001, each of these must still go to its own (closed) port."""
    ns, cg, r = lab
    srv = _listen(ns, r)
    try:
        assert _run(ns, cg if cgroup == "cg" else "-", dst, port) == "refused"
    finally:
        srv.kill()
        srv.wait()


def test_fail_closed_without_listener(lab: tuple[str, str, BpfRedirector]) -> None:
    """No ztunnel listener: refused by connect4 itself (EPERM, recorded as a kernel-side
    drop), even though 10.77.0.2:80 has a server."""
    ns, cg, _ = lab
    real = subprocess.Popen(
        [
            "nsenter",
            f"--net=/run/netns/{ns}",
            sys.executable,
            "-c",
            "import socket\nl=socket.create_server(('10.77.0.2',80))\nprint('ready',flush=True)\n"
            "import time\ntime.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert real.stdout is not None and real.stdout.readline().strip() == "ready"
        assert _run(ns, "-", "10.77.0.2", "80") == "connected"  # control: server is reachable
        assert _run(ns, cg, "10.77.0.2", "80") == "eperm"
    finally:
        real.kill()
        real.wait()


def test_unenrol_stops_redirect(lab: tuple[str, str, BpfRedirector]) -> None:
    ns, cg, r = lab
    srv = _listen(ns, r)
    try:
        for _ in range(2):  # idempotent
            r.unenrol(cg)
            remove_inbound_capture(f"/run/netns/{ns}")
        assert _run(ns, cg, "10.77.0.2", "80") == "refused"
    finally:
        srv.kill()
        srv.wait()


INBOUND = textwrap.dedent(
    """
    import socket, struct
    l = socket.create_server(("0.0.0.0", 15006)); print("ready", flush=True)
    c, _ = l.accept(); raw = c.getsockopt(socket.SOL_IP, 80, 16)
    port, = struct.unpack("!H", raw[2:4]); print(socket.inet_ntoa(raw[4:8]), port)
    """
)


def test_inbound_capture_to_15006(lab: tuple[str, str, BpfRedirector]) -> None:
    """A connection from another netns to the pod's :8080 lands on 15006 (conntrack dst)."""
    ns, _, _ = lab
    peer = ns[:-3] + "cli"
    subprocess.run(["ip", "netns", "add", peer], check=True)
    try:
        for cmd in (
            ["ip", "link", "add", f"{ns[:8]}a", "netns", ns, "type", "veth", "peer", "name",
             f"{ns[:8]}b", "netns", peer],
            ["ip", "-n", ns, "addr", "add", "10.78.0.1/24", "dev", f"{ns[:8]}a"],
            ["ip", "-n", peer, "addr", "add", "10.78.0.2/24", "dev", f"{ns[:8]}b"],
            ["ip", "-n", ns, "link", "set", f"{ns[:8]}a", "up"],
            ["ip", "-n", peer, "link", "set", f"{ns[:8]}b", "up"],
        ):  # fmt: skip
            subprocess.run(cmd, check=True)
        srv = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c", INBOUND],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
            assert _run(peer, "-", "10.78.0.1", "8080") == "connected"
            out, _ = srv.communicate(timeout=10)
            assert out.split() == ["10.78.0.1", "8080"]
        finally:
            srv.kill()
            srv.wait()
    finally:
        subprocess.run(["ip", "netns", "del", peer], check=False)


def test_uninstall_leaves_no_pins_or_attachments(lab: tuple[str, str, BpfRedirector]) -> None:
    ns, cg, r = lab
    r.unenrol(cg)
    remove_inbound_capture(f"/run/netns/{ns}")
    r.uninstall()
    assert not os.path.exists(r.pin_root)
    srv = _listen(ns, r)
    try:  # nothing attached any more: the pod's connect goes to the real (closed) port
        assert _run(ns, cg, "10.77.0.2", "80") == "refused"
    finally:
        srv.kill()
        srv.wait()


BULK_SERVER = textwrap.dedent(
    """
    import hashlib, socket
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("127.0.0.1", 15001)); l.listen(); print("ready", flush=True)
    c, _ = l.accept(); h = hashlib.sha256(); n = 0
    while n < 32 << 20:
        d = c.recv(1 << 20); h.update(d); n += len(d)
    c.sendall(h.digest() * 4096); c.close()
    """
)
BULK_CLIENT = textwrap.dedent(
    """
    import hashlib, os, socket, sys
    open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
    s = socket.create_connection(("10.77.0.2", 80), timeout=20)
    blob = os.urandom(1 << 20); h = hashlib.sha256()
    for i in range(32):
        h.update(blob); s.sendall(blob)
    back = b""
    while len(back) < 32 * 4096:
        d = s.recv(1 << 16)
        if not d: break
        back += d
    print(back == h.digest() * 4096)
    """
)


@pytest.mark.parametrize("lab", [True], indirect=True)
def test_fastpath_bytes_intact_both_ways(lab: tuple[str, str, BpfRedirector]) -> None:
    ns, cg, r = lab
    srv = subprocess.Popen(
        as_proxy(r, ns, BULK_SERVER),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        cli = subprocess.run(
            ["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c", BULK_CLIENT, cg],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.stdout.strip() == "True", cli.stderr
    finally:
        srv.kill()
        srv.wait()
