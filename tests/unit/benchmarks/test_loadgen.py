"""The load generator must count time spent queued behind a slow response (no coordinated
omission), or every latency figure in the benchmark report understates the tail."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest

STALL_S = 0.3


async def http_server(stall_first_after: int) -> tuple[asyncio.AbstractServer, list[int]]:
    """A keep-alive HTTP/1.1 server that stalls once, after `stall_first_after` requests."""
    count = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if length:
                    await reader.readexactly(length)
                count[0] += 1
                if count[0] == stall_first_after:
                    await asyncio.sleep(STALL_S)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, count


@pytest.fixture
async def stalling_server() -> AsyncIterator[int]:
    server, _ = await http_server(stall_first_after=20)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def run_loadgen(*args: str) -> dict[str, object]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.loadgen", *args, stdout=subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    result: dict[str, object] = json.loads(out)
    return result


async def test_open_loop_counts_queueing_behind_a_stall(stalling_server: int) -> None:
    # 100 rps on one connection: during a 300 ms stall ~30 requests come due and must wait;
    # a closed-loop client would record only the one slow request.
    res = await run_loadgen(
        f"http://127.0.0.1:{stalling_server}/",
        "--rate",
        "100",
        "--duration",
        "2",
        "--connections",
        "1",
    )
    lat = res["latency_ms"]
    assert isinstance(lat, dict)
    assert res["errors"] == 0
    assert res["completed"] == res["requests"]
    # Requests that came due during the stall waited for it: well over 10 % of the run.
    assert lat["p90"] >= 0.25 * STALL_S * 1000
    assert lat["max"] >= STALL_S * 1000 * 0.9
    assert lat["p50"] < STALL_S * 1000


async def test_closed_loop_maximum_rate_completes_requests(stalling_server: int) -> None:
    res = await run_loadgen(
        f"http://127.0.0.1:{stalling_server}/",
        "--rate",
        "0",
        "--duration",
        "1",
        "--connections",
        "4",
        "--body-size",
        "64",
    )
    assert res["errors"] == 0
    assert isinstance(res["completed"], int) and res["completed"] > 50
    assert res["statuses"] == {"200": res["completed"]}
