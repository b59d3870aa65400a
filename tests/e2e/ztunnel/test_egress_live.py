"""A policy change closes the live outbound connections it no longer allows (as Istio does),
and ztunnel refuses new ones too: the pods, netns, ztunnels and HBONE of test_inpod, real
(root only). The kernel's own refusal of new connects is tests/e2e/bpf/test_egress_policy.py."""

from __future__ import annotations

import asyncio
from typing import Any

from mesh.config.parse import parse_objects
from mesh.netns import NetNs
from tests.e2e.ztunnel.test_inpod import (  # noqa: F401 (fixtures)
    APP_PORT,
    Mesh,
    enrol_both,
    manifest,
    mesh,
    pods,
    talk_from,
)


def _egress(ports: list[int] | None) -> dict[str, Any]:
    """web's egress: to echo pods on `ports`, or (None) nowhere at all."""
    rules = [] if ports is None else [
        {"to": [{"podSelector": {"matchLabels": {"app": "echo"}}}],
         "ports": [{"port": p} for p in ports]}
    ]  # fmt: skip
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "web-out", "namespace": "shop"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"],
                 "egress": rules},
    }  # fmt: skip


def publish(m: Mesh, ports: list[int] | None) -> None:
    p = m.pods
    m.store.publish(parse_objects([*manifest(p.a_ip, p.b_ip, p.vip), _egress(ports)]))


async def test_policy_change_closes_live_denied_connection(mesh: Mesh) -> None:  # noqa: F811
    p = mesh.pods
    await enrol_both(mesh)
    publish(mesh, [APP_PORT])
    ns = NetNs(f"/run/netns/{p.a_ns}")
    try:
        sock = await ns.connect(p.vip, 80, connect_timeout=5)
    finally:
        ns.close()
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(b"one")
        assert await asyncio.wait_for(reader.readexactly(len(p.b_ip) + 4), 10) == (
            f"{p.b_ip}|one".encode()
        )
        publish(mesh, [APP_PORT + 1])  # echo on 8080 no longer allowed
        try:
            rest = await asyncio.wait_for(reader.read(), 10)
        except ConnectionError:
            rest = b""
        assert rest == b"", "the denied connection was left open"
    finally:
        writer.close()
    # new connects are refused by ztunnel too (no BPF here, so it is ztunnel's check)
    assert await talk_from(p.a_ns, p.vip, 80, b"two") == b""
    publish(mesh, [APP_PORT])
    await asyncio.sleep(0.2)
    assert await talk_from(p.a_ns, p.vip, 80, b"three") == f"{p.b_ip}|three".encode()
    assert len(mesh.m1.live) == 0
