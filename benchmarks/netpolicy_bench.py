"""What NetworkPolicy/CNP ingress costs ztunnel per connection: CONNECT setup through a real
inbound HBONE listener (TLS, h2, a real dial to an app on loopback) with no policy, and with a
policy isolating the destination; plus the lookup alone (the per-snapshot table, hit and
miss) against calling `decide()` each time. Rounds alternate so load drift hits both.

    python3 -m benchmarks.netpolicy_bench [--streams 2000] [--rounds 3]

Not a test: it prints figures and never fails on a number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from certs.ca import CertificateAuthority
from mesh.config.parse import parse_objects
from mesh.config.snapshot import Snapshot
from mesh.hbone import serve
from mesh.identity.manager import Identities
from mesh.ingress_policy import IngressPolicy
from mesh.metrics import MeshMetrics
from mesh.netpolicy import Direction, decide
from ztunnel.proxy import InboundHbone, Node

ECHO_IP = "127.0.0.3"
WEB = "spiffe://cluster.local/ns/shop/sa/web"


def two_nodes(app_port: int) -> list[dict[str, Any]]:
    """web (127.0.0.1) on n1 calls echo (127.0.0.3) on n2 (127.0.0.2), all ambient."""

    def node(name: str, ip: str) -> dict[str, Any]:
        addr = [{"type": "InternalIP", "address": ip}]
        return {"kind": "Node", "apiVersion": "v1", "metadata": {"name": name},
                "status": {"addresses": addr}}  # fmt: skip

    def pod(name: str, node: str, ip: str) -> dict[str, Any]:
        return {"kind": "Pod", "apiVersion": "v1",
                "metadata": {"name": name, "namespace": "shop", "labels": {"app": name}},
                "spec": {"nodeName": node, "serviceAccountName": name},
                "status": {"podIP": ip}}  # fmt: skip

    amb = {"istio.io/dataplane-mode": "ambient"}
    return [
        node("n1", "127.0.0.1"), node("n2", "127.0.0.2"),
        {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": "shop", "labels": amb}},
        pod("web", "n1", "127.0.0.1"), pod("echo", "n2", ECHO_IP),
        {"kind": "Service", "apiVersion": "v1", "metadata": {"name": "echo", "namespace": "shop"},
         "spec": {"clusterIP": "10.96.0.9", "selector": {"app": "echo"},
                  "ports": [{"port": 80, "targetPort": app_port}]}},
    ]  # fmt: skip


POLICY: dict[str, Any] = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {"name": "echo-from-web", "namespace": "shop"},
    "spec": {
        "podSelector": {"matchLabels": {"app": "echo"}},
        "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}],
    },
}


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        await reader.read()
    writer.close()


async def setup_rate(streams: int, rounds: int, concurrency: int) -> dict[str, list[float]]:
    """CONNECTs per second over pooled HBONE connections (`concurrency` at a time), off and
    on, alternating."""
    with tempfile.TemporaryDirectory() as tmp:
        ids = Identities(CertificateAuthority.init(Path(tmp) / "ca"))
        app = await asyncio.start_server(_sink, ECHO_IP, 0)
        port = app.sockets[0].getsockname()[1]
        plain = parse_objects(two_nodes(port))
        isolated = parse_objects([*two_nodes(port), POLICY])
        snap: list[Snapshot] = [plain]
        node = Node("n2", lambda: snap[0], ids, MeshMetrics())
        hbone = await serve(
            "127.0.0.2", 0, ids.server_context(node.identity), InboundHbone(node),
            trust_domain="cluster.local",
        )  # fmt: skip
        hport = hbone.sockets[0].getsockname()[1]
        client = Node("n1", lambda: snap[0], ids, MeshMetrics(), hbone_port=hport)
        peers = frozenset({node.identity})
        out: dict[str, list[float]] = {"off": [], "on": []}

        async def worker(n: int) -> None:
            for _ in range(n):
                st = await client.pool.connect(
                    WEB, ("127.0.0.2", hport), f"{ECHO_IP}:{port}", expected_peers=peers
                )
                st.abort()

        each = max(1, streams // concurrency)
        try:
            # warm-up, not counted: the pool's TLS handshakes, the table's first build
            await asyncio.gather(*(worker(each) for _ in range(concurrency)))
            for _ in range(rounds):
                for mode, s in (("off", plain), ("on", isolated)):
                    snap[0] = s
                    t0 = time.perf_counter()
                    await asyncio.gather(
                        *(worker(streams // concurrency) for _ in range(concurrency))
                    )
                    out[mode].append(
                        streams // concurrency * concurrency / (time.perf_counter() - t0)
                    )
        finally:
            hbone.close()
            app.close()
            client.pool.close()
            for t in (*client.tasks, *node.tasks):
                t.cancel()
            await asyncio.sleep(0.1)
        return out


def lookup_ns(n: int) -> dict[str, float]:
    """ns per ingress lookup: the table for a pod no policy isolates (a dict miss), for an
    isolated one (a memo hit), and `decide()` scanning the policies each time."""
    snap = parse_objects([*two_nodes(8080), POLICY])
    table = IngressPolicy()
    out: dict[str, float] = {}
    cases: dict[str, Callable[[], object]] = {
        "table, not isolated": lambda: table.check(
            snap, ECHO_IP, "127.0.0.1", 80, authenticated=True
        ),
        "table, isolated (memo)": lambda: table.check(
            snap, "127.0.0.1", ECHO_IP, 8080, authenticated=True
        ),
        "decide() each time": lambda: decide(
            snap, "127.0.0.1", ECHO_IP, 8080, Direction.INGRESS, authenticated=True
        ),
    }
    for name, fn in cases.items():
        fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out[name] = (time.perf_counter() - t0) / n * 1e9
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--streams", type=int, default=2000, help="CONNECTs per round and mode")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=16, help="CONNECTs in flight")
    p.add_argument("--lookups", type=int, default=200_000)
    a = p.parse_args(argv)
    rates = asyncio.run(setup_rate(a.streams, a.rounds, a.concurrency))
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    print(f"CONNECT setup through inbound HBONE ({a.rounds} rounds x {a.streams}, "
          f"{a.concurrency} in flight, median):")  # fmt: skip
    print(f"  no policy:            {off:8.0f} /s  ({1e6 / off:6.1f} us per CONNECT)")
    print(f"  destination isolated: {on:8.0f} /s  ({1e6 / on:6.1f} us per CONNECT)")
    print(f"  on/off rate ratio:    {on / off:8.3f}")
    print("ingress lookup alone:")
    for name, ns in lookup_ns(a.lookups).items():
        print(f"  {name:24s} {ns:8.0f} ns")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
