"""The fast path inside ztunnel: web (enrolled, in-pod listener) calls a same-node pod outside
the mesh through a Service VIP, so ztunnel passes it through in plaintext on one node; the
splice is paired in the sockhash, bytes arrive intact both ways, and an egress policy change
still closes the live connection (the pods, netns and ztunnels of test_inpod, real; root)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
from typing import Any

from bpf.fastpath import FastPathMaps
from mesh.config.parse import parse_objects
from mesh.netns import NetNs
from tests.e2e.ztunnel.test_egress_live import _egress
from tests.e2e.ztunnel.test_fastpath import pins  # noqa: F401 (fixture)
from tests.e2e.ztunnel.test_inpod import (  # noqa: F401 (fixtures)
    APP_PORT,
    Mesh,
    ask,
    manifest,
    mesh,
    pods,
)
from ztunnel.proxy.fastpath import FastPath


def _same_node(m: Mesh, egress_ports: list[int]) -> None:
    p = m.pods
    docs: list[dict[str, Any]] = manifest(p.a_ip, p.b_ip, p.vip)
    for d in docs:
        if d["kind"] == "Pod" and d["metadata"]["name"] == "echo":
            d["spec"]["nodeName"] = "n1"  # beside web
            d["metadata"]["labels"]["istio.io/dataplane-mode"] = "none"  # outside the mesh
    m.store.publish(parse_objects([*docs, _egress(egress_ports)]))


async def test_same_node_passthrough_is_paired_and_policy_still_closes_it(
    mesh: Mesh,  # noqa: F811
    pins: str,  # noqa: F811
) -> None:
    p = mesh.pods
    maps = FastPathMaps.open_pinned(pins)
    mesh.n1.fastpath = fast = FastPath(maps)
    try:
        # echo is not enrolled: nothing of ztunnel's captures its inbound
        flush = ["ip", "netns", "exec", p.b_ns, "iptables", "-w", "-t", "nat", "-F", "PREROUTING"]
        await asyncio.to_thread(subprocess.run, flush, check=True)
        _same_node(mesh, [APP_PORT])
        reply = await ask(mesh.sock1, op="add", namespace="shop", name="web",
                          netns=f"/run/netns/{p.a_ns}", cgroup=None)  # fmt: skip
        assert reply == {"ok": True, "enrolled": True}, reply
        ns = NetNs(f"/run/netns/{p.a_ns}")
        try:
            sock = await ns.connect(p.vip, 80, connect_timeout=5)
        finally:
            ns.close()
        reader, writer = await asyncio.open_connection(sock=sock)
        hello = f"{p.a_ip}|".encode()
        assert await asyncio.wait_for(reader.readexactly(len(hello)), 10) == hello
        blob = os.urandom(4 << 20)

        async def send() -> None:
            writer.write(blob)
            await writer.drain()

        sender = asyncio.create_task(send())
        back = await asyncio.wait_for(reader.readexactly(len(blob)), 30)
        await sender
        assert hashlib.sha256(back).digest() == hashlib.sha256(blob).digest()
        assert fast.engaged == 1 and maps.in_sockhash() == 2

        _same_node(mesh, [APP_PORT + 1])  # echo's port no longer allowed: cut it
        try:
            rest = await asyncio.wait_for(reader.read(), 10)
        except ConnectionError:
            rest = b""
        assert rest == b""
        writer.close()
        for _ in range(100):
            if maps.in_sockhash() == 0:
                break
            await asyncio.sleep(0.05)
        assert maps.in_sockhash() == 0
    finally:
        mesh.n1.fastpath = None
        maps.close()
