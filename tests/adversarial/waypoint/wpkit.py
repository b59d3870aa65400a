"""A real waypoint process under attack, and what the attacks need to see it.

    test (HBONE, mTLS) ─CONNECT─► waypoint process ─HBONE─► ztunnel n2 (in-process) ─► backend

The waypoint runs as `python -m waypoint.main` with small limits (so each attack trips them
fast); the hostile bytes travel inside CONNECT streams exactly as a mesh client's would: raw
HTTP/1.1 bytes, or HTTP/2 frames made with the real `h2`/`hyperframe`/`hpack` libraries. The
backend (`tests.fakes.backend`) counts the requests it is serving, so a test can see upstream
work being cancelled. `Proc` reads the process's fds and RSS from /proc (with attackkit's
readers), for the "back to baseline" checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import yaml

from certs.ca import CertificateAuthority
from mesh.config.parse import parse_objects
from mesh.hbone import HbonePool, serve
from mesh.hbone.pool import Listener
from mesh.identity.manager import Identities
from mesh.metrics import MeshMetrics
from tests.adversarial.attackkit import fd_count, rss_kib
from tests.fakes.backend import Backend, BackendStats
from ztunnel.proxy import InboundHbone, Node

ROOT = Path(__file__).resolve().parents[3]
TD = "cluster.local"
CLIENT = f"spiffe://{TD}/ns/ns/sa/client"
WAYPOINT = f"spiffe://{TD}/ns/ns/sa/waypoint"
VIP = "10.9.9.9:80"
BACKEND_IP = "127.0.0.3"
WAYPOINT_IP = "127.0.0.9"

# Small on purpose: an attack trips them in a few frames or bytes.
LIMITS = {
    "--max-header-bytes": "8192",
    "--max-headers": "50",
    "--headers-timeout": "1",
    "--max-concurrent-streams": "20",
    "--max-connections": "40",
    "--idle-timeout": "2",
}

CONFIG = """
apiVersion: v1
kind: Namespace
metadata: {{name: ns, labels: {{istio.io/use-waypoint: waypoint}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: ns}}
spec: {{gatewayClassName: waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: waypoint-0, namespace: ns,
           labels: {{gateway.networking.k8s.io/gateway-name: waypoint}}}}
spec: {{nodeName: n2, serviceAccountName: waypoint}}
status: {{podIP: {wp}}}
---
apiVersion: v1
kind: Node
metadata: {{name: n2}}
status: {{addresses: [{{type: InternalIP, address: 127.0.0.2}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: backend, namespace: ns, labels: {{app: web}}}}
spec: {{nodeName: n2}}
status: {{podIP: {backend}}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: ns}}
spec:
  clusterIP: 10.9.9.9
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: {port}, appProtocol: http}}]
"""


# ---------------------------------------------------------------------------------------------
# The waypoint process


class Proc:
    def __init__(self, pid: int) -> None:
        self.pid = pid

    def fds(self) -> int:
        return fd_count(self.pid)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)


class Inner:
    """The test's end of one CONNECT stream: collects what the waypoint sends back."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = asyncio.Event()
        self.changed = asyncio.Event()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.bytes_received = self.bytes_sent = 0

    def join(self, peer: object) -> None:
        pass

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.data += data
        self.changed.set()

    def write_eof(self) -> None:
        self.eof.set()
        self.changed.set()

    def abort(self) -> None:
        self.write_eof()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@dataclass
class Stream:
    wire: object  # the HboneStream
    inner: Inner

    def send(self, data: bytes) -> None:
        self.wire.write(data)  # type: ignore[attr-defined]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.wire.abort()  # type: ignore[attr-defined]


@dataclass
class Waypoint:
    proc: Proc
    process: asyncio.subprocess.Process
    pool: HbonePool
    stats: BackendStats
    ports: dict[str, int]
    log: Path

    async def stream(self) -> Stream:
        s = await self.pool.connect(
            CLIENT, (WAYPOINT_IP, self.ports["hbone"]), VIP, expected_peers=frozenset({WAYPOINT})
        )
        inner = Inner()
        s.join(inner)  # type: ignore[arg-type]
        return Stream(s, inner)

    async def h1(self, raw: bytes, wait: float = 10.0) -> tuple[bytes, bool]:
        """Send `raw` on a fresh stream; the whole answer and whether the waypoint closed."""
        st = await self.stream()
        st.send(raw)
        try:
            await asyncio.wait_for(st.inner.eof.wait(), wait)
        except TimeoutError:
            return bytes(st.inner.data), False
        finally:
            st.close()
        return bytes(st.inner.data), True

    async def good_h1(self) -> None:
        data, _ = await self.h1(b"GET / HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 200"), data
        assert json.loads(data.partition(b"\r\n\r\n")[2])["pod"] == "backend", data

    async def good_h2(self) -> None:
        c = H2Client(await self.stream())
        try:
            sid = c.request("/")
            status = await c.response(sid)
            assert status == 200
        finally:
            c.st.close()

    async def good(self) -> None:
        await self.good_h1()
        await self.good_h2()

    async def metrics(self) -> str:
        r, w = await asyncio.open_connection("127.0.0.1", self.ports["metrics"])
        w.write(b"GET /metrics HTTP/1.1\r\n\r\n")
        out = (await r.read(-1)).decode()
        w.close()
        return out

    async def settle(self, baseline: tuple[int, int], within: float = 15.0) -> tuple[int, int]:
        """Wait until fds are back to the baseline and RSS within a margin of it (Python's
        allocator keeps some arenas: 16 MiB is far below what a leak of the attacks here
        would hold, e.g. 1,000 upstream connections or buffered frames)."""
        fds0, rss0 = baseline
        loop = asyncio.get_running_loop()
        end = loop.time() + within
        while True:
            fds, rss = self.proc.fds(), self.proc.rss_kib()
            if (fds <= fds0 and rss <= rss0 + 16 * 1024) or loop.time() > end:
                return fds, rss
            await asyncio.sleep(0.2)


class H2Client:
    """A real h2 client on one CONNECT stream; frames it would never send go out raw."""

    def __init__(self, st: Stream) -> None:
        self.st = st
        self.c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.c.initiate_connection()
        self.st.send(self.c.data_to_send())
        self.events: list[h2.events.Event] = []
        self._seen = 0

    def request(self, path: str, *, extra: list[tuple[str, str]] | None = None) -> int:
        sid = self.c.get_next_available_stream_id()
        hs = [(":method", "GET"), (":scheme", "http"), (":authority", "web"), (":path", path)]
        self.c.send_headers(sid, hs + (extra or []), end_stream=True)
        self.st.send(self.c.data_to_send())
        return sid

    def pump(self) -> None:
        """Feed what arrived to h2 (and answer what h2 answers, e.g. SETTINGS ACKs)."""
        data = bytes(self.st.inner.data[self._seen :])
        self._seen += len(data)
        if data:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.events += self.c.receive_data(data)
            out = self.c.data_to_send()
            if out:
                self.st.send(out)

    async def wait(self, pred: Callable[[list[h2.events.Event]], bool], within: float = 10) -> None:
        async with asyncio.timeout(within):
            while True:
                self.pump()
                if pred(self.events) or self.st.inner.eof.is_set():
                    self.pump()
                    return
                self.st.inner.changed.clear()
                await self.st.inner.changed.wait()

    async def response(self, sid: int) -> int:
        def got(evs: list[h2.events.Event]) -> bool:
            return any(
                isinstance(e, h2.events.ResponseReceived | h2.events.StreamReset)
                and e.stream_id == sid
                for e in evs
            )

        await self.wait(got)
        for e in self.events:
            if isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid:
                return int(dict(e.headers)[b":status"])
        return 0

    def goaway(self) -> h2.events.ConnectionTerminated | None:
        for e in self.events:
            if isinstance(e, h2.events.ConnectionTerminated):
                return e
        return None


async def start(tmp: Path) -> tuple[Waypoint, Callable[[], Awaitable[None]]]:
    ca = CertificateAuthority.init(tmp / "ca")
    ids = Identities(ca)
    stats = BackendStats()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Backend("backend", stats, "ns"), BACKEND_IP, 0)
    bport = server.sockets[0].getsockname()[1]
    text = CONFIG.format(wp=WAYPOINT_IP, backend=BACKEND_IP, port=bport)
    cfg = tmp / "mesh.yaml"
    cfg.write_text(text)
    snap = parse_objects(list(yaml.safe_load_all(text)))
    n2 = Node("n2", lambda: snap, ids, MeshMetrics())
    hbone2: Listener = await serve(
        "127.0.0.2", 0, ids.server_context(n2.identity), InboundHbone(n2), trust_domain=TD
    )
    args = [a for kv in LIMITS.items() for a in kv]
    log = tmp / "waypoint.log"  # its log and access log (stderr)
    errf = log.open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "waypoint.main", "--namespace", "ns", "--config", str(cfg),
        "--ca-dir", str(tmp / "ca"), "--hbone-addr", f"{WAYPOINT_IP}:0",
        "--readiness-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0",
        "--admin-addr", "127.0.0.1:0", "--log-level", "info",
        "--upstream-hbone-port", str(hbone2.sockets[0].getsockname()[1]), *args,
        env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=asyncio.subprocess.PIPE,
        stderr=errf,
    )  # fmt: skip
    errf.close()  # the child has its own copy
    pool = HbonePool(ids.client_context_async, trust_domain=TD)
    assert proc.stdout is not None
    ports: dict[str, int] = {}
    try:
        while len(ports) < 4:
            line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            assert line, "waypoint exited"
            if " on " in line:
                ports[line.split()[2]] = int(line.split()[4])
    except BaseException:
        proc.kill()
        await proc.wait()
        raise

    async def stop() -> None:
        pool.close()
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        hbone2.close()
        server.close()

    wp = Waypoint(Proc(proc.pid), proc, pool, stats, ports, log)
    return wp, stop
