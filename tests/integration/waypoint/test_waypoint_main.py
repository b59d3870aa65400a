"""The waypoint process: starts, answers readiness, rejects bad flags with a clear message."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def test_bad_address_flag_is_one_line_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "waypoint.main", "--namespace", "ns", "--readiness-addr", "nope"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "--readiness-addr 'nope': expected HOST:PORT" in out.stderr


async def test_readiness_and_unknown_service() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "waypoint.main",
        "--namespace",
        "ns",
        "--readiness-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
        "--authority",
        "10.9.9.9:80",
        env=ENV,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        ports = {}
        for _ in range(2):
            line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().split()
            ports[line[2]] = int(line[-1])
        r, w = await asyncio.open_connection("127.0.0.1", ports["readiness"])
        w.write(b"GET /healthz/ready HTTP/1.1\r\n\r\n")
        assert (await r.read(-1)).startswith(b"HTTP/1.1 200")
        r, w = await asyncio.open_connection("127.0.0.1", ports["http"])
        w.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        data = await r.read(-1)
        assert data.startswith(b"HTTP/1.1 503") and b"service 10.9.9.9:80 not found" in data
    finally:
        proc.terminate()
        await proc.wait()


def test_invalid_config_at_start_names_object_and_field(tmp_path: Path) -> None:
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
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "Service ns/web" in out.stderr and "ports[0].port" in out.stderr


CONFIG = """
apiVersion: v1
kind: Pod
metadata: {{name: backend, namespace: ns, labels: {{app: web}}}}
spec: {{nodeName: n1}}
status: {{podIP: 127.0.0.1}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: ns}}
spec:
  clusterIP: 10.9.9.9
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: {port}}}]
"""


async def test_config_change_applies_live(tmp_path: Path) -> None:
    async def backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        # Keep-alive, as the waypoint's upstream pool expects of a backend.
        try:
            while True:
                await r.readuntil(b"\r\n\r\n")
                w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\nbackend")
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            w.close()

    server = await asyncio.start_server(backend, "127.0.0.1", 0)
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: ns}\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "waypoint.main", "--namespace", "ns", "--config", str(cfg),
        "--readiness-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0",
        "--authority", "10.9.9.9:80",
        env=ENV, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip

    async def get(port: int) -> bytes:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET / HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n")
        data = await r.read(-1)
        w.close()
        return data

    try:
        assert proc.stdout is not None
        ports = {}
        for _ in range(2):
            line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().split()
            ports[line[2]] = int(line[-1])
        assert (await get(ports["http"])).startswith(b"HTTP/1.1 503")
        cfg.write_text(CONFIG.format(port=server.sockets[0].getsockname()[1]))
        for _ in range(100):
            data = await get(ports["http"])
            if data.startswith(b"HTTP/1.1 200"):
                break
            await asyncio.sleep(0.1)
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"backend")
    finally:
        proc.terminate()
        await proc.wait()
        server.close()
