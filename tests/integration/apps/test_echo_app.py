"""The built-in echo app over real loopback sockets: what it reports is what tests rely on."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mesh.apps.echo import HttpEcho, TcpEcho

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
async def http_port() -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    ident = {"pod": "srv", "namespace": "ns1"}
    server = await loop.create_server(lambda: HttpEcho(ident), "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def test_keep_alive_requests_report_caller_and_request(http_port: int) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", http_port)
    local = w.get_extra_info("sockname")
    answers = []
    for path in ("/a?x=1", "/b"):
        w.write(f"GET {path} HTTP/1.1\r\nhost: t\r\nx-trace: 7\r\n\r\n".encode())
        head = await r.readuntil(b"\r\n\r\n")
        length = int(next(h.split(b":")[1] for h in head.split(b"\r\n")
                          if h.lower().startswith(b"content-length")))  # fmt: skip
        answers.append(json.loads(await r.readexactly(length)))
    w.close()
    assert [a["path"] for a in answers] == ["/a?x=1", "/b"]
    assert all(a["peer"] == f"{local[0]}:{local[1]}" for a in answers)  # same connection
    assert answers[0]["pod"] == "srv" and answers[0]["namespace"] == "ns1"
    assert answers[0]["headers"]["x-trace"] == "7"


async def test_body_is_counted_and_connection_close_honoured(http_port: int) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", http_port)
    w.write(b"POST /p HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello")
    data = await asyncio.wait_for(r.read(-1), 5)  # server closes
    body = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert body["method"] == "POST" and body["body_bytes"] == 5
    w.close()


async def test_garbage_gets_400_and_close(http_port: int) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", http_port)
    w.write(b"NOT HTTP AT ALL\r\n\r\n")
    data = await asyncio.wait_for(r.read(-1), 5)
    assert data.startswith(b"HTTP/1.1 400")
    w.close()


async def test_tcp_mode_echoes_bulk_and_half_close() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(TcpEcho, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        r, w = await asyncio.open_connection("127.0.0.1", port)
        blob = bytes(range(256)) * 4096  # 1 MiB
        w.write(blob)
        w.write_eof()
        got = await asyncio.wait_for(r.read(-1), 10)
        assert got == blob
        w.close()


def test_client_exit_status_and_lines_against_real_process() -> None:
    """The CLI client the demo runs: exit 0 with answers, 1 with one JSON error per attempt."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: refused
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    res = subprocess.run(
        [sys.executable, "-m", "mesh.apps.client", f"http://127.0.0.1:{port}/", "--count", "2"],
        capture_output=True, text=True, env=env, timeout=30,
    )  # fmt: skip
    assert res.returncode == 1
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert [x["ok"] for x in lines] == [False, False]
    assert "Refused" in lines[0]["error"]
    echo = subprocess.Popen(
        [sys.executable, "-m", "mesh.apps.echo", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert echo.stdout is not None
        line = echo.stdout.readline()
        port = int(line.rsplit(":", 1)[1])
        res = subprocess.run(
            [sys.executable, "-m", "mesh.apps.client", f"http://127.0.0.1:{port}/x", "--count",
             "3"], capture_output=True, text=True, env=env, timeout=30,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        lines = [json.loads(x) for x in res.stdout.splitlines()]
        assert [x["status"] for x in lines] == [200, 200, 200]
        assert len({x["body"]["peer"] for x in lines}) == 1  # keep-alive reuses one connection
    finally:
        echo.terminate()
        echo.wait(10)
