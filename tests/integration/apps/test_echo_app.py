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


async def h2_exchange(port: int, chunks: list[bytes], body: bytes) -> dict[str, object]:
    """One h2c request with prior knowledge; the client's first bytes go in `chunks` pieces."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(
        sid,
        [(":method", "POST"), (":path", "/h2"), (":scheme", "http"), (":authority", "t"),
         ("x-trace", "9")],
    )  # fmt: skip
    for i in range(0, len(body), 16384):  # the default largest frame
        conn.send_data(sid, body[i : i + 16384], end_stream=i + 16384 >= len(body))
    first = conn.data_to_send()
    r, w = await asyncio.open_connection("127.0.0.1", port)
    cut = 0
    for n in chunks:
        w.write(first[cut : cut + n])
        await w.drain()
        await asyncio.sleep(0.05)  # the server sees each piece on its own
        cut += n
    w.write(first[cut:])
    status, data = "", b""
    ended = False
    while not ended:
        raw = await asyncio.wait_for(r.read(65536), 5)
        assert raw, "server closed the connection"
        for ev in conn.receive_data(raw):
            if isinstance(ev, h2.events.ResponseReceived):
                status = dict(ev.headers)[b":status"].decode()
            elif isinstance(ev, h2.events.DataReceived):
                data += ev.data
            elif isinstance(ev, h2.events.StreamEnded):
                ended = True
        w.write(conn.data_to_send())
    w.close()
    answer: dict[str, object] = json.loads(data)
    answer["status"] = status
    return answer


async def test_h2c_prior_knowledge_on_the_same_port(http_port: int) -> None:
    a = await h2_exchange(http_port, [], b"x" * 20000)
    assert a["status"] == "200" and a["protocol"] == "h2"
    assert a["method"] == "POST" and a["path"] == "/h2" and a["body_bytes"] == 20000
    assert a["headers"] == {"x-trace": "9"}


async def test_h2_preface_split_across_reads_is_still_h2(http_port: int) -> None:
    # "P", then "RI * HTTP/2", then the rest: undecided until the preface is whole
    a = await h2_exchange(http_port, [1, 10], b"abc")
    assert a["protocol"] == "h2" and a["body_bytes"] == 3
