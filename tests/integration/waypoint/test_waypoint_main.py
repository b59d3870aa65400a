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
