"""The waypoint process: starts, answers readiness, rejects bad flags with a clear message."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from certs.ca import CertificateAuthority
from mesh.config.parse import parse_objects
from mesh.hbone import HboneError, HbonePool, serve
from mesh.identity.manager import Identities
from mesh.metrics import MeshMetrics
from ztunnel.proxy import InboundHbone, Node

ROOT = Path(__file__).resolve().parents[3]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
TD = "cluster.local"
CLIENT = f"spiffe://{TD}/ns/ns/sa/client"
WAYPOINT = f"spiffe://{TD}/ns/ns/sa/waypoint"


def test_bad_address_flag_is_one_line_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "waypoint.main", "--namespace", "ns", "--readiness-addr", "nope"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "--readiness-addr 'nope': expected HOST:PORT" in out.stderr


def test_invalid_config_at_start_names_object_and_field(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    CertificateAuthority.init(ca_dir)
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: ns}\n"
        "spec: {clusterIP: 10.9.9.9, ports: [{port: 99999}]}\n"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "waypoint.main",
            "--namespace",
            "ns",
            "--config",
            str(cfg),
            "--readiness-addr",
            "127.0.0.1:0",
            "--ca-dir",
            str(ca_dir),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "Service ns/web" in out.stderr and "ports[0].port" in out.stderr


def test_limit_that_would_refuse_everyone_is_a_clear_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "waypoint.main", "--namespace", "ns", "--max-headers", "0"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "max_headers must be positive" in out.stderr


def test_missing_ca_is_a_clear_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "waypoint.main", "--namespace", "ns"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "give --ca-dir or --ca" in out.stderr


def test_bad_otlp_endpoint_is_a_clear_error(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "waypoint.main", "--namespace", "ns", "--ca-dir", str(tmp_path),
         "--otlp-endpoint", "collector"],
        env=ENV, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2 and "--otlp-endpoint 'collector': expected HOST:PORT" in out.stderr


def test_trace_sampling_out_of_range_is_a_clear_error(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "waypoint.main", "--namespace", "ns", "--ca-dir", str(tmp_path),
         "--trace-sampling", "150"],
        env=ENV, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2 and "--trace-sampling 150: expected a percentage" in out.stderr


def test_otlp_endpoint_without_the_extra_names_it(tmp_path: Path) -> None:
    """grpcio absent (as without `ambientmesh[otlp]`): refused at start, saying what to install."""
    code = (
        "import sys; sys.modules['grpc'] = None; from waypoint.main import main; "
        f"sys.exit(main(['--namespace', 'ns', '--ca-dir', {str(tmp_path)!r}, "
        "'--otlp-endpoint', '127.0.0.1:4317']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2
    assert "--otlp-endpoint: OTLP export needs the 'otlp' extra" in out.stderr
    assert "pip install 'ambientmesh[otlp]'" in out.stderr


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
status: {{podIP: 127.0.0.9}}
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
status: {{podIP: 127.0.0.3}}
"""
SERVICE = """
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: ns}}
spec:
  clusterIP: 10.9.9.9
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: {port}, appProtocol: http}}]
"""


class Collector:
    """The far end of a CONNECT stream, for a test: collects what arrives."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = asyncio.Event()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.bytes_received = self.bytes_sent = 0

    def join(self, peer: object) -> None:
        pass

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.data += data

    def write_eof(self) -> None:
        self.eof.set()

    def abort(self) -> None:
        self.eof.set()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def test_process_serves_hbone_with_its_identity_and_follows_config(tmp_path: Path) -> None:
    """The real process: HBONE CONNECT to it as a mesh client, HTTP inside, answered by a
    backend behind a ztunnel; a Service added to the config file later starts being served.
    With `--otlp-endpoint` its span reaches a real OTLP receiver, and with `--forwarded` the
    backend sees a `Forwarded` element naming the waypoint."""
    from tests.integration.waypoint.test_waypoint_tracing import otlp_receiver

    ca = CertificateAuthority.init(tmp_path / "ca")
    ids = Identities(ca)
    heads: list[bytes] = []

    async def backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                heads.append(await r.readuntil(b"\r\n\r\n"))
                w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\nbackend")
                await w.drain()
        w.close()

    server = await asyncio.start_server(backend, "127.0.0.3", 0)
    bport = server.sockets[0].getsockname()[1]
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(CONFIG.format())
    snap = [parse_objects(list(yaml.safe_load_all(CONFIG.format() + SERVICE.format(port=bport))))]
    receiver, otlp_server, otlp_port = otlp_receiver()
    n2 = Node("n2", lambda: snap[0], ids, MeshMetrics())
    hbone2 = await serve(
        "127.0.0.2", 0, ids.server_context(n2.identity), InboundHbone(n2), trust_domain=TD
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "waypoint.main", "--namespace", "ns", "--config", str(cfg),
        "--ca-dir", str(tmp_path / "ca"), "--hbone-addr", "127.0.0.9:0",
        "--readiness-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0",
        "--admin-addr", "127.0.0.1:0",
        "--upstream-hbone-port", str(hbone2.sockets[0].getsockname()[1]),
        "--otlp-endpoint", f"127.0.0.1:{otlp_port}", "--forwarded",
        env=ENV, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    pool = HbonePool(ids.client_context_async, trust_domain=TD)
    try:
        assert proc.stdout is not None
        lines = [(await asyncio.wait_for(proc.stdout.readline(), 30)).decode() for _ in range(3)]
        assert lines[0].split()[-1] == WAYPOINT
        ports = {ln.split()[2]: int(ln.split()[4]) for ln in lines}
        r, w = await asyncio.open_connection("127.0.0.1", ports["readiness"])
        w.write(b"GET /healthz/ready HTTP/1.1\r\n\r\n")
        assert (await r.read(-1)).startswith(b"HTTP/1.1 200")
        w.close()

        async def get() -> bytes:
            s = await pool.connect(
                CLIENT, ("127.0.0.9", ports["hbone"]), "10.9.9.9:80",
                expected_peers=frozenset({WAYPOINT}),
            )  # fmt: skip
            c = Collector()
            s.join(c)  # type: ignore[arg-type]
            s.write(b"GET / HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n")
            await asyncio.wait_for(c.eof.wait(), 10)
            return bytes(c.data)

        with pytest.raises(HboneError) as err:
            await get()
        assert err.value.status == 400
        cfg.write_text(CONFIG.format() + SERVICE.format(port=bport))
        for _ in range(100):
            with contextlib.suppress(HboneError):
                data = await get()
                break
            await asyncio.sleep(0.1)
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"backend")
        r, w = await asyncio.open_connection("127.0.0.1", ports["metrics"])
        w.write(b"GET /metrics HTTP/1.1\r\n\r\n")
        metrics = (await r.read(-1)).decode()
        assert "istio_requests_total{" in metrics and 'response_code="200"' in metrics
        head = heads[-1].decode().lower()
        assert "\r\nforwarded: by=_waypoint.ns;proto=http\r\n" in head
        traceparent = next(ln for ln in head.split("\r\n") if ln.startswith("traceparent: "))
        for _ in range(200):  # batched: within a second or so
            if receiver.spans():
                break
            await asyncio.sleep(0.05)
        (resource, span), *_ = receiver.spans()
        assert traceparent.split("-")[2] == span.span_id.hex()
        res = {kv.key: kv.value.string_value for kv in resource.attributes}
        assert res["service.name"] == "waypoint.ns"
    finally:
        otlp_server.stop(None)
        pool.close()
        proc.terminate()
        await proc.wait()
        hbone2.close()
        server.close()
