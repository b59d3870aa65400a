"""Attacks on real ztunnel processes in a lab (root): two nodes, pods in their own netns and
cgroups, BPF capture and in-pod listeners (the "enrol" capture). One lab serves the module.

The attacker is either an enrolled pod (commands run inside mesh/web: its connects are
redirected by BPF, as any app's would be) or a pod that holds a mesh SVID of its own and talks
to node n2's HBONE port directly from its netns (plain/client, using a certificate for
mesh/web's identity from the lab's CA: "any pod that holds its own SVID").

Every case asserts (a) the refusal, (b) that a good request (mesh/web -> Service mesh/server
through both ztunnels) succeeds right after, (c) that the attacked ztunnel's fds come back to
the baseline (small slack: pooled connections come and go) and its RSS stays within a
generous bound of it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h2.errors
import pytest

from certs.ca import CertificateAuthority
from mesh.ports import HBONE_PORT
from meshctl.lab import observe
from meshctl.lab.demo import wait_for_app
from meshctl.lab.lab import Lab
from meshctl.lab.system import socket_in_netns
from meshctl.lab.ztunnels import ZtunnelFeatures
from tests.adversarial.attackkit import Peer, fd_count, open_peer, rss_kib, tls_context
from tests.e2e.lab.labkit import MANIFEST, leftovers, remove_roots, seen, unique_paths

WEB_ID = "spiffe://cluster.local/ns/mesh/sa/web"
FD_SLACK = 4
RSS_SLACK_KIB = 48 * 1024

LOOP = (
    "import socket,sys\n"
    "s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=5)\n"
    "s.sendall(b'ping')\n"
    "s.settimeout(5)\n"
    "try:\n    d=s.recv(100)\nexcept OSError:\n    d=b''\n"
    "print(repr(d))\n"
)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if not ZtunnelFeatures.probe().enrol_socket:
        pytest.skip("ztunnel has no --enrol-socket")
    paths = unique_paths()
    f = tmp_path_factory.mktemp("adv") / "lab.yaml"
    f.write_text(MANIFEST)
    lab = Lab(paths, mesh=True, capture="enrol", out=lambda _m: None)
    try:
        lab.up(f)
        wait_for_app(lab, "mesh/server")
        yield lab
    finally:
        was = seen(lab)
        problems = lab.down(quiet=True)
        left = leftovers(lab.paths, [], was)
        remove_roots(lab.paths)
        assert not problems, problems
        assert not left, f"lab down left: {left}"


@dataclass
class Proc:
    pid: int
    fds: int
    rss: int


def ztunnel(lab: Lab, node: str) -> Proc:
    rec = next(r for r in lab.state.procs if r.kind == "ztunnel" and r.name == node)
    return Proc(rec.pid, fd_count(rec.pid), rss_kib(rec.pid))


def refused(lab: Lab, node: str, reason: str) -> float:
    total = 0.0
    for line in lab.ztunnel_metrics(node).splitlines():
        if line.startswith("ambientmesh_refused_total{") and f'reason="{reason}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def ip_of(lab: Lab, pod: str) -> str:
    return str(lab.state.pods[pod]["ip"])


def node_ip(lab: Lab, node: str) -> str:
    return str(lab.state.nodes[node]["ip"])


def good_request(lab: Lab) -> None:
    svc = lab.snapshot().service("mesh", "server")
    assert svc is not None and svc.cluster_ip
    res = lab.exec_in_pod(
        "mesh", "web", ["python", "-m", "mesh.apps.client", f"http://{svc.cluster_ip}/",
                        "--count", "1", "--timeout", "5", "--new-connection"],
    )  # fmt: skip
    out = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert out and out[0]["ok"], res.stdout + res.stderr


def back_to_baseline(
    lab: Lab, node: str, base: Proc, timeout: float = 20.0, rss_slack: int = RSS_SLACK_KIB
) -> Proc:
    """Waits for both: fds as connections close, RSS as memory is given back."""
    deadline = time.monotonic() + timeout
    now = ztunnel(lab, node)
    while (
        now.fds > base.fds + FD_SLACK or now.rss > base.rss + rss_slack
    ) and time.monotonic() < deadline:
        time.sleep(0.2)
        now = ztunnel(lab, node)
    assert now.fds <= base.fds + FD_SLACK, f"ztunnel {node} fds {base.fds} -> {now.fds}"
    assert now.rss <= base.rss + rss_slack, f"ztunnel {node} RSS {base.rss} -> {now.rss} KiB"
    return now


@pytest.fixture
def baseline(lab: Lab) -> Iterator[dict[str, Proc]]:
    """Both ztunnels' figures after a good request (pooled connections exist); checked again,
    with a good request first, after the case."""
    good_request(lab)
    time.sleep(0.3)
    base = {n: ztunnel(lab, n) for n in ("n1", "n2")}
    yield base
    good_request(lab)
    for n in ("n1", "n2"):
        back_to_baseline(lab, n, base[n])


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def attacker_socket(lab: Lab, host: str, port: int) -> socket.socket:
    """A TCP connection from inside plain/client's netns (not enrolled: nothing redirects)."""
    s = socket_in_netns(str(lab.state.pods["plain/client"]["netns"]))
    s.settimeout(5)
    s.connect((host, port))
    s.setblocking(False)
    return s


async def attacker(lab: Lab, ctx: ssl.SSLContext | None = None, **kw: Any) -> Peer:
    ca = CertificateAuthority.load(lab.paths.ca_dir)
    sock = attacker_socket(lab, node_ip(lab, "n2"), HBONE_PORT)
    return await open_peer("", 0, ctx or tls_context(ca, WEB_ID), sock=sock, **kw)


# -- the three attacks of the issue -------------------------------------------------------


def test_self_loop_is_refused_once(lab: Lab, baseline: dict[str, Proc]) -> None:
    """From inside an enrolled pod: 127.0.0.1:15001 (redirected to ztunnel, whose original
    destination is its own listener), the pod's own IP:15001 and :15006 (through HBONE back
    to its own node). Each is one refusal, not a loop. (The other node's pods' ztunnel ports
    through CONNECT: test_bad_requests_are_answered_and_the_connection_kept.)"""
    web = ip_of(lab, "mesh/web")
    before = refused(lab, "n1", "self_loop")
    for host, port in (("127.0.0.1", 15001), (web, 15001), (web, 15006)):
        res = lab.exec_in_pod("mesh", "web", ["python", "-c", LOOP, host, str(port)])
        assert "ping" not in res.stdout, res.stdout + res.stderr
    time.sleep(0.3)
    assert refused(lab, "n1", "self_loop") - before == 3
    flags = [r for r in lab.ztunnel_access_log("n1") if r.get("response_flags") == "NR"]
    assert len(flags) >= 3


def test_reset_streams_release_upstreams(lab: Lab, baseline: dict[str, Proc]) -> None:
    """1,000 CONNECT + RST_STREAM pairs on one HBONE connection to the server pod."""
    target = f"{ip_of(lab, 'mesh/server')}:8080"

    async def attack() -> bool:
        p = await attacker(lab)
        await p.pump(until=1, settle=0.1)
        for i in range(1000):
            sid = p.connect(target)
            if i % 2:
                p.flush()
                await asyncio.sleep(0)
            p.reset(sid)
            p.flush()
            if i % 100 == 99:
                await p.pump(until=0.5, settle=0.02)
        await p.pump(until=2, settle=0.5)
        alive = not p.closed and p.goaway is None
        p.close()
        return alive

    assert run(attack())
    back_to_baseline(lab, "n2", baseline["n2"])


def test_forwarded_for_from_a_workload_is_ignored(lab: Lab, baseline: dict[str, Proc]) -> None:
    target = f"{ip_of(lab, 'mesh/server')}:8080"
    before = refused(lab, "n2", "forwarded_ignored")

    async def attack() -> int | None:
        p = await attacker(lab)
        sid = p.connect(target, [("forwarded", "for=10.9.9.9")])
        p.flush()
        status = await p.wait_for(sid)
        p.reset(sid)
        p.flush()
        await p.pump(until=0.3, settle=0.1)
        p.close()
        return status

    assert run(attack()) == 200  # allowed: the policy does not care; the address does
    time.sleep(0.5)
    assert refused(lab, "n2", "forwarded_ignored") - before == 1
    real = ip_of(lab, "plain/client")
    assert observe.records_from(lab.ztunnel_access_log("n2"), real)
    assert not observe.records_from(lab.ztunnel_access_log("n2"), "10.9.9.9")


def test_streams_before_settings_past_the_limit(lab: Lab, baseline: dict[str, Proc]) -> None:
    target = f"{ip_of(lab, 'mesh/server')}:8080"

    async def attack() -> tuple[int, int, bool]:
        p = await attacker(lab, send_preface=False)
        p.h2.initiate_connection()
        sids = [p.connect(target) for _ in range(150)]
        p.flush()
        for _ in range(40):
            await p.pump(until=1.0, settle=0.3)
            if len(p.responses) + len(p.resets) >= 150:
                break
        ok = sum(1 for s in sids if p.responses.get(s) == 200)
        rst = sum(1 for s in sids if p.resets.get(s) == h2.errors.ErrorCodes.REFUSED_STREAM)
        alive = not p.closed and p.goaway is None
        p.close()
        return ok, rst, alive

    assert run(attack()) == (100, 50, True)


# -- what passed before and must keep passing ---------------------------------------------


def test_handshake_attacks_are_refused(lab: Lab, baseline: dict[str, Proc], tmp_path: Path) -> None:
    """Garbage instead of TLS, TLS without a client certificate, a certificate from a foreign
    CA, HTTP/1.1 (ALPN) instead of h2."""
    n2 = node_ip(lab, "n2")

    async def closed(ctx: ssl.SSLContext | None, payload: bytes = b"") -> bool:
        sock = attacker_socket(lab, n2, HBONE_PORT)
        try:
            if ctx is None:
                r, w = await asyncio.open_connection(sock=sock)
            else:
                r, w = await asyncio.open_connection(sock=sock, ssl=ctx,
                                                     server_hostname="hbone.mesh")  # fmt: skip
            w.write(payload or b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            data = await asyncio.wait_for(r.read(1 << 16), 5)
            w.close()
        except (ssl.SSLError, ConnectionError):
            return True
        return b"HTTP/1.1 200" not in data and not data.startswith(b"\x00")

    foreign = CertificateAuthority.init(tmp_path / "foreign")
    h1 = tls_context(CertificateAuthority.load(lab.paths.ca_dir), WEB_ID)
    h1.set_alpn_protocols(["http/1.1"])

    async def attack() -> list[bool]:
        return [
            await closed(None, b"\x16\x03\x01garbage" * 100),
            await closed(tls_context(None, None)),
            await closed(tls_context(foreign, WEB_ID)),
            await closed(h1),
        ]

    assert run(attack()) == [True] * 4


def test_bad_requests_are_answered_and_the_connection_kept(
    lab: Lab, baseline: dict[str, Proc]
) -> None:
    """GET instead of CONNECT (405), CONNECT to a pod of another node, to the node's own
    HBONE address, to ztunnel's in-pod ports, to malformed authorities (400), and 200 KiB of
    headers (that connection ends; the node keeps serving)."""
    server, web = ip_of(lab, "mesh/server"), ip_of(lab, "mesh/web")
    n2 = node_ip(lab, "n2")
    loops = refused(lab, "n2", "self_loop")

    async def attack() -> tuple[list[int | None], bool]:
        p = await attacker(lab)
        statuses: list[int | None] = []
        sid = p.request([(":method", "GET"), (":scheme", "https"), (":path", "/"),
                         (":authority", f"{server}:8080")])  # fmt: skip
        p.flush()
        statuses.append(await p.wait_for(sid))
        for authority in (f"{web}:8080", f"{n2}:15008", f"{server}:15008", f"{server}:15006",
                          "nonsense", f"{server}:99999", "[::1]:80", ":80"):  # fmt: skip
            sid = p.connect(authority)
            p.flush()
            statuses.append(await p.wait_for(sid))
        alive = not p.closed and p.goaway is None
        p.close()
        big = await attacker(lab)
        await big.pump(until=0.5, settle=0.1)
        big.connect(f"{server}:8080", [("x-big", "a" * (200 * 1024))])
        big.flush()
        await big.pump(until=3, settle=1)
        assert big.closed or big.goaway is not None
        big.close()
        return statuses, alive

    statuses, alive = run(attack())
    assert statuses == [405] + [400] * 8 and alive, statuses
    assert refused(lab, "n2", "self_loop") - loops == 2  # server:15008 and server:15006


def test_stalled_handshakes(lab: Lab, baseline: dict[str, Proc]) -> None:
    """300 TCP connections that never start TLS: the node serves meanwhile, and gives every
    fd back once they go."""
    n2 = node_ip(lab, "n2")
    stalled = [attacker_socket(lab, n2, HBONE_PORT) for _ in range(300)]
    good_request(lab)
    assert ztunnel(lab, "n2").fds >= baseline["n2"].fds + 300
    for s in stalled:
        s.close()


def test_idle_mtls_connections(lab: Lab) -> None:
    """1,000 idle mTLS connections, held, then dropped. The node serves meanwhile and gives
    every fd back. RSS does not come back to the baseline: the process keeps its peak (about
    60 MiB above the baseline here; glibc's malloc_trim does not shrink it), hence the wider
    bound for this case. (A second burst in the same process has been seen to add up to 45 MiB
    more when it follows the other cases: recorded in the issue's notes, not asserted.)"""
    good_request(lab)
    time.sleep(0.3)
    base = ztunnel(lab, "n2")
    n2 = node_ip(lab, "n2")

    async def idle() -> int:
        ca = CertificateAuthority.load(lab.paths.ca_dir)
        ctx = tls_context(ca, WEB_ID)
        held: list[asyncio.StreamWriter] = []
        for _ in range(1000):
            sock = attacker_socket(lab, n2, HBONE_PORT)
            _, w = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname="hbone.mesh")
            held.append(w)
        good_request(lab)
        peak = fd_count(ztunnel(lab, "n2").pid)
        for w in held:
            w.transport.abort()
        return peak

    assert run(idle()) >= base.fds + 1000  # all held open by ztunnel
    good_request(lab)
    back_to_baseline(lab, "n2", base, rss_slack=96 * 1024)
