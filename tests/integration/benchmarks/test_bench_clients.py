"""The benchmark's clients against the real echo app on loopback: HTTP/2 with 16 KiB bodies on
many streams must not stall on flow control, and a bulk upload is counted by the server."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from benchmarks import bulk
from mesh.apps.echo import HttpEcho

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: HttpEcho({"pod": "srv", "namespace": "ns"}), "127.0.0.1", 0
    )
    async with server:
        yield server.sockets[0].getsockname()[1]


async def loadgen(port: int, *args: str) -> dict[str, object]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.loadgen", f"http://127.0.0.1:{port}/x", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    result: dict[str, object] = json.loads(out)
    return result


async def test_h2_with_16k_bodies_on_many_streams(echo_port: int) -> None:
    r = await loadgen(echo_port, "--http2", "--body-size", "16384", "--rate", "800",
                      "--duration", "1", "--connections", "1", "--streams", "64")  # fmt: skip
    assert r["protocol"] == "h2" and r["errors"] == 0
    assert r["completed"] == r["requests"] and r["statuses"] == {"200": r["completed"]}


async def test_bulk_upload_is_counted_by_the_server(echo_port: int) -> None:
    out = await asyncio.to_thread(bulk.upload, "127.0.0.1", echo_port, "/bulk", 8 << 20, 30.0)
    assert out["ok"] is True and out["server_counted"] == 8 << 20
    assert isinstance(out["mib_per_s"], float) and out["mib_per_s"] > 0
