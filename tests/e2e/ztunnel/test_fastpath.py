"""The same-node fast path (`ztunnel.proxy.fastpath`) on a real kernel: real sockets, the
sk_skb verdict compiled by `python -m bpf.fastpath load` in a child, pinned under a test root
and unpinned after (root only)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for BPF")

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def pins() -> Iterator[str]:
    from bpf import syscall
    from bpf.fastpath import pin_dir

    root = f"/sys/fs/bpf/ambientmesh-test-{secrets.token_hex(2)}-fp"
    out = subprocess.run(
        [sys.executable, "-m", "bpf.fastpath", "load", "--pin-root", root],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    fd = syscall.obj_get(os.path.join(pin_dir(root), "fastpath_prog"))
    prog_id = syscall.obj_id(fd)
    os.close(fd)
    try:
        yield root
    finally:
        subprocess.run([sys.executable, "-m", "bpf.fastpath", "unload", "--pin-root", root],
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True)  # fmt: skip
        os.rmdir(root)
        assert not syscall.exists("prog", prog_id), "the verdict program outlived its pins"


def _acct(flows: object) -> object:
    from mesh.metrics import ConnectionLabels, MeshMetrics
    from mesh.telemetry import Accounting

    return Accounting(
        MeshMetrics(), ConnectionLabels.build(reporter="source"), reporter="source",
        src="10.0.0.1", dst="10.0.0.2:80", src_identity=None, dst_identity=None, service=None,
        mtls=False, flows=flows,  # type: ignore[arg-type]
    )  # fmt: skip


async def _relay(
    fast: object | None, up_port: int, engaged: list[object]
) -> tuple[asyncio.Server, list[asyncio.Task[None]]]:
    """A ztunnel-shaped relay on loopback: accept, dial the server, splice (fast or not)."""
    from mesh.flows import FlowRing
    from mesh.tcp import TcpEndpoint
    from ztunnel.proxy.fastpath import FastPath
    from ztunnel.proxy.node import splice

    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []
    ring = FlowRing(16, node="n1", proxy="ztunnel")

    async def serve(down: TcpEndpoint) -> None:
        _, up = await loop.create_connection(TcpEndpoint, "127.0.0.1", up_port)
        acct = _acct(ring)
        engaged.append((down, up, ring))
        if isinstance(fast, FastPath):
            await fast.splice(down, up, acct)  # type: ignore[arg-type]
        else:
            await splice(down, up, acct)  # type: ignore[arg-type]

    def made(ep: TcpEndpoint) -> None:
        tasks.append(loop.create_task(serve(ep)))

    server = await loop.create_server(lambda: TcpEndpoint(on_made=made), "127.0.0.1", 0)
    return server, tasks


async def _transfer(fast: object | None, up_mib: int, down_mib: int) -> dict[str, object]:
    """Client sends `up_mib` then half-closes; the server reads to EOF, answers with the
    digest it saw and `down_mib` of its own, then closes."""
    up_blob, down_blob = os.urandom(up_mib << 20), os.urandom(down_mib << 20)

    async def server(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        h = hashlib.sha256()
        while chunk := await r.read(1 << 20):
            h.update(chunk)
        w.write(h.digest() + down_blob)
        await w.drain()
        w.close()

    srv = await asyncio.start_server(server, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    seen: list[object] = []
    relay, tasks = await _relay(fast, port, seen)
    r, w = await asyncio.open_connection("127.0.0.1", relay.sockets[0].getsockname()[1])
    w.write(up_blob)
    await w.drain()
    w.write_eof()
    got = await asyncio.wait_for(r.read(), 60)
    w.close()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    relay.close()
    srv.close()
    down, up, ring = seen[0]  # type: ignore[misc]
    return {
        "digest_ok": got[:32] == hashlib.sha256(up_blob).digest(),
        "down_ok": got[32:] == down_blob,
        "down": down, "up": up, "flows": ring.since(0)[0],
    }  # fmt: skip


def test_fast_path_carries_bytes_both_ways_and_counts_them(
    pins: str, caplog: pytest.LogCaptureFixture
) -> None:
    from bpf.fastpath import FastPathMaps
    from ztunnel.proxy.fastpath import FastPath

    maps = FastPathMaps.open_pinned(pins)
    fast = FastPath(maps)
    try:
        with caplog.at_level(logging.INFO, logger="mesh.access"):
            res = asyncio.run(_transfer(fast, 24, 8))
        assert fast.engaged == 1 and fast.fallbacks == 0
        assert res["digest_ok"] and res["down_ok"]
        down = res["down"]
        # the kernel moved (nearly) all of it, and the counters still say every byte
        assert down.bytes_received == 24 << 20  # type: ignore[attr-defined]
        assert down.bytes_sent == 32 + (8 << 20)  # type: ignore[attr-defined]
        (flow,) = res["flows"]  # type: ignore[misc]
        assert flow.verdict == "FORWARDED"
        assert (flow.bytes_sent, flow.bytes_received) == (24 << 20, 32 + (8 << 20))
        logged = [rec.getMessage() for rec in caplog.records if rec.name == "mesh.access"]
        assert any(f'"bytes_sent":{24 << 20}' in m.replace(" ", "") for m in logged), logged
        assert maps.in_sockhash() == 0  # closed sockets leave the sockhash
        assert all(m is None for m in [None])
    finally:
        maps.close()


def test_slow_path_never_touches_the_sockhash(pins: str) -> None:
    from bpf.fastpath import FastPathMaps

    maps = FastPathMaps.open_pinned(pins)
    try:
        res = asyncio.run(_transfer(None, 4, 1))
        assert res["digest_ok"] and res["down_ok"]
        assert res["down"].bytes_received == 4 << 20  # type: ignore[attr-defined]
        assert maps.in_sockhash() == 0
    finally:
        maps.close()
