"""The same-node fast path (`ztunnel.proxy.fastpath`) on a real kernel: real sockets, the
sk_skb verdict compiled by `python -m bpf.fastpath load` in a child, pinned under a test root
and unpinned after (root only)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bpf.fastpath import FastPathMaps
from mesh.flows import Flow, FlowRing
from mesh.metrics import ConnectionLabels, MeshMetrics
from mesh.tcp import TcpEndpoint
from mesh.telemetry import Accounting
from ztunnel.proxy.fastpath import FastPath, open_fastpath
from ztunnel.proxy.node import splice

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for BPF")

ROOT = Path(__file__).resolve().parents[3]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


@pytest.fixture(scope="module")
def pins() -> Iterator[str]:
    from bpf import syscall
    from bpf.fastpath import pin_dir

    root = f"/sys/fs/bpf/ambientmesh-test-{secrets.token_hex(2)}-fp"
    out = subprocess.run(
        [sys.executable, "-m", "bpf.fastpath", "load", "--pin-root", root],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    ids = []
    for name in ("fastpath_prog", "fastpath_socks", "fastpath_peer"):
        fd = syscall.obj_get(os.path.join(pin_dir(root), name))
        ids.append(("prog" if name.endswith("prog") else "map", syscall.obj_id(fd)))
        os.close(fd)
    try:
        yield root
    finally:
        subprocess.run([sys.executable, "-m", "bpf.fastpath", "unload", "--pin-root", root],
                       env=ENV, check=True)  # fmt: skip
        os.rmdir(root)
        for kind, ident in ids:
            assert not syscall.exists(kind, ident), f"{kind} {ident} outlived its pins"


@pytest.fixture
def maps(pins: str) -> Iterator[FastPathMaps]:
    m = FastPathMaps.open_pinned(pins)
    try:
        yield m
    finally:
        m.close()


@dataclass
class Seen:
    down: TcpEndpoint
    up: TcpEndpoint
    ring: FlowRing


async def _relay(fast: FastPath | None, up_port: int, seen: list[Seen]) -> asyncio.Server:
    """A ztunnel-shaped relay on loopback: accept, dial the server, splice (fast or not)."""
    loop = asyncio.get_running_loop()
    ring = FlowRing(16, node="n1", proxy="ztunnel")

    async def serve(down: TcpEndpoint) -> None:
        _, up = await loop.create_connection(TcpEndpoint, "127.0.0.1", up_port)
        acct = Accounting(
            MeshMetrics(), ConnectionLabels.build(reporter="source"), reporter="source",
            src="10.0.0.1", dst="10.0.0.2:80", src_identity=None, dst_identity=None,
            service=None, mtls=False, flows=ring,
        )  # fmt: skip
        seen.append(Seen(down, up, ring))
        await (fast.splice if fast is not None else splice)(down, up, acct)

    def made(ep: TcpEndpoint) -> None:
        task = loop.create_task(serve(ep))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    tasks: set[asyncio.Task[None]] = set()
    server = await loop.create_server(lambda: TcpEndpoint(on_made=made), "127.0.0.1", 0)
    server.tasks = tasks  # type: ignore[attr-defined]
    return server


async def _finish(relay: asyncio.Server) -> None:
    tasks: set[asyncio.Task[None]] = relay.tasks  # type: ignore[attr-defined]
    if tasks:
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
    relay.close()


@dataclass
class Result:
    digest_ok: bool
    back_ok: bool
    seen: Seen
    flows: list[Flow]


async def _transfer(fast: FastPath | None, up_mib: int, down_mib: int) -> Result:
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
    seen: list[Seen] = []
    relay = await _relay(fast, srv.sockets[0].getsockname()[1], seen)
    r, w = await asyncio.open_connection("127.0.0.1", relay.sockets[0].getsockname()[1])
    w.write(up_blob)
    await w.drain()
    w.write_eof()  # half-close: the answer still has to come back
    got = await asyncio.wait_for(r.read(), 60)
    w.close()
    await _finish(relay)
    srv.close()
    return Result(
        got[:32] == hashlib.sha256(up_blob).digest(), got[32:] == down_blob, seen[0],
        seen[0].ring.since(0)[0],
    )  # fmt: skip


def test_fast_path_carries_bytes_both_ways_and_counts_them(
    maps: FastPathMaps, caplog: pytest.LogCaptureFixture
) -> None:
    fast = FastPath(maps)

    with caplog.at_level(logging.INFO, logger="mesh.access"):
        res = asyncio.run(_transfer(fast, 24, 8))
    assert (fast.engaged, fast.fallbacks) == (1, 0)
    assert res.digest_ok and res.back_ok
    # every byte counted, though the kernel moved them (not ztunnel's reader)
    assert res.seen.down.bytes_received == 24 << 20
    assert res.seen.down.bytes_sent == 32 + (8 << 20)
    (flow,) = res.flows
    assert flow.verdict == "FORWARDED"
    assert (flow.bytes_sent, flow.bytes_received) == (24 << 20, 32 + (8 << 20))
    logged = [r.getMessage() for r in caplog.records if r.name == "mesh.access"]
    assert any(f'"bytes_sent":{24 << 20},' in m for m in logged), logged
    assert maps.in_sockhash() == 0  # closed sockets leave the sockhash


def test_many_small_exchanges_keep_order(maps: FastPathMaps) -> None:
    """Request/response on one connection: each answer must follow its request, whichever
    of them crossed while the legs were being paired."""
    fast = FastPath(maps)

    async def run() -> None:
        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while line := await r.readline():
                w.write(line.upper())
                await w.drain()
            w.close()

        srv = await asyncio.start_server(echo, "127.0.0.1", 0)
        relay = await _relay(fast, srv.sockets[0].getsockname()[1], [])
        r, w = await asyncio.open_connection("127.0.0.1", relay.sockets[0].getsockname()[1])
        for i in range(300):
            w.write(f"req-{i}-{'x' * (i % 50)}\n".encode())
            assert await asyncio.wait_for(r.readline(), 10) == (
                f"REQ-{i}-{'X' * (i % 50)}\n".encode()
            )
        w.write_eof()
        assert await asyncio.wait_for(r.read(), 10) == b""
        w.close()
        await _finish(relay)
        srv.close()

    asyncio.run(run())
    assert fast.engaged == 1


def test_closing_both_legs_cuts_a_fast_path_connection(maps: FastPathMaps) -> None:
    """What LiveOutbound.enforce does when a policy change denies a live connection (abort
    both endpoints) ends a paired one too: the app sees the end, the sockhash empties."""
    fast = FastPath(maps)

    async def run() -> None:
        server_saw_end = asyncio.Event()

        async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while await r.read(1 << 16):
                    pass
            except ConnectionError:
                pass
            server_saw_end.set()
            w.close()

        srv = await asyncio.start_server(sink, "127.0.0.1", 0)
        seen: list[Seen] = []
        relay = await _relay(fast, srv.sockets[0].getsockname()[1], seen)
        r, w = await asyncio.open_connection("127.0.0.1", relay.sockets[0].getsockname()[1])
        w.write(b"x" * 100_000)
        await w.drain()
        for _ in range(200):
            if fast.engaged:
                break
            await asyncio.sleep(0.01)
        assert fast.engaged == 1 and maps.in_sockhash() == 2
        seen[0].down.abort()  # LiveOutbound's close()
        seen[0].up.abort()
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(r.read(), 10) == b""
        await asyncio.wait_for(server_saw_end.wait(), 10)
        w.close()
        await _finish(relay)
        srv.close()
        (flow,) = seen[0].ring.since(0)[0]
        assert flow.bytes_sent == 100_000

    asyncio.run(run())
    assert maps.in_sockhash() == 0


def test_kernel_refusal_falls_back_to_user_space(
    maps: FastPathMaps, caplog: pytest.LogCaptureFixture
) -> None:
    """The kernel will not take the sockets (here: the sockhash's fd is no BPF map): the
    connection is spliced in user space, correctly, and the refusal logged once."""
    not_a_map = os.open("/dev/null", os.O_RDONLY)
    fast = FastPath(FastPathMaps(not_a_map, maps.peer_fd))
    try:
        with caplog.at_level(logging.WARNING, logger="ztunnel.fastpath"):
            res = asyncio.run(_transfer(fast, 4, 1))
            res2 = asyncio.run(_transfer(fast, 1, 1))
    finally:
        os.close(not_a_map)
    assert res.digest_ok and res.back_ok and res2.digest_ok and res2.back_ok
    assert fast.engaged == 0 and fast.fallbacks >= 1  # (a quick one may end before pairing)
    assert res.seen.down.bytes_received == 4 << 20
    refused = [r for r in caplog.records if "refused by the kernel" in r.getMessage()]
    assert len(refused) == 1
    assert maps.in_sockhash() == 0 and maps.redirected(0) == 0


def test_off_and_missing_program(maps: FastPathMaps) -> None:
    """`--fastpath off` and `auto` (user space, the measured rule) have no fast path: the
    slow splice, nothing in the sockhash; `on` without a loadable program refuses to start."""
    from bpf.loader import BpfUnavailable

    assert open_fastpath("off", "/sys/fs/bpf/unused") is None
    assert open_fastpath("auto", "/sys/fs/bpf/unused") is None
    res = asyncio.run(_transfer(None, 2, 1))
    assert res.digest_ok and res.back_ok and maps.in_sockhash() == 0
    nowhere = f"/proc/ambientmesh-test-{secrets.token_hex(2)}"  # bpffs cannot go there
    with pytest.raises(BpfUnavailable, match="--fastpath on"):
        open_fastpath("on", nowhere)


def test_a_reset_from_the_app_reaches_the_other_side(maps: FastPathMaps) -> None:
    """Pod A resets its paired connection: ztunnel is not reading it, yet B must see the end
    promptly (and the sockhash empties), as when ztunnel's reader sees the reset."""
    import socket
    import struct

    fast = FastPath(maps)

    async def run() -> float:
        ended = asyncio.Event()

        async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while await r.read(1 << 16):
                    pass
            ended.set()
            w.close()

        srv = await asyncio.start_server(sink, "127.0.0.1", 0)
        relay = await _relay(fast, srv.sockets[0].getsockname()[1], [])
        _r, w = await asyncio.open_connection("127.0.0.1", relay.sockets[0].getsockname()[1])
        w.write(b"y" * 50_000)
        await w.drain()
        for _ in range(200):
            if fast.engaged:
                break
            await asyncio.sleep(0.01)
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        t0 = asyncio.get_running_loop().time()
        w.transport.abort()  # RST
        await asyncio.wait_for(ended.wait(), 10)
        took = asyncio.get_running_loop().time() - t0
        await _finish(relay)
        srv.close()
        return took

    took = asyncio.run(run())
    assert fast.engaged == 1
    assert maps.in_sockhash() == 0
    print(f"reset reached the server after {took * 1000:.1f} ms")
