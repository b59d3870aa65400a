"""Outbound with a real redirect: in a network namespace of its own, an app connects to a
service VIP, a netfilter REDIRECT sends it to ztunnel's :15001, and ztunnel reads the original
destination with getsockopt(SO_ORIGINAL_DST) and tunnels it over HBONE to the other node."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = textwrap.dedent(
    """
    import asyncio, tempfile
    from pathlib import Path
    from tests.meshkit import two_nodes as manifest, echo, VIP
    from certs.ca import CertificateAuthority
    from mesh.config.parse import parse_objects
    from mesh.hbone import serve
    from mesh.metrics import MeshMetrics
    from mesh.identity.manager import Identities
    from ztunnel.proxy import InboundHbone, Node, Outbound

    async def main() -> None:
        ca = CertificateAuthority.init(Path(tempfile.mkdtemp()) / "ca")
        srv = await asyncio.start_server(echo, "127.0.0.3", 0)
        snap = parse_objects(manifest(srv.sockets[0].getsockname()[1]))
        ids = Identities(ca)
        n2 = Node("n2", lambda: snap, ids, MeshMetrics())
        await serve("127.0.0.2", 15008, ids.server_context(n2.identity), InboundHbone(n2),
                    trust_domain="cluster.local")
        n1 = Node("n1", lambda: snap, ids, MeshMetrics())
        loop = asyncio.get_running_loop()
        await loop.create_server(Outbound(n1).protocol, "0.0.0.0", 15001)  # real SO_ORIGINAL_DST
        r, w = await asyncio.open_connection(VIP, 80)
        w.write(b"through the redirect")
        w.write_eof()
        print((await asyncio.wait_for(r.read(-1), 10)).decode())
        print("mtls" if b'connection_security_policy="mutual_tls"' in n2.metrics.exposition()
              else "no-mtls")

    import logging
    logging.basicConfig(level=logging.INFO)
    asyncio.run(main())
    """
)


def test_vip_connect_is_redirected_and_tunnelled(tmp_path: Path) -> None:
    ns = f"am-{secrets.token_hex(2)}-zt"
    script = tmp_path / "inside.py"
    script.write_text(SCRIPT)
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True)
        run = lambda *a: subprocess.run(["ip", "netns", "exec", ns, *a], check=True)  # noqa: E731
        run("ip", "link", "set", "lo", "up")
        run("ip", "route", "add", "10.96.0.0/16", "dev", "lo", "src", "127.0.0.1")
        run("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "10.96.0.10",
            "--dport", "80", "-j", "REDIRECT", "--to-ports", "15001")  # fmt: skip
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, str(script)],
            capture_output=True, text=True, timeout=60,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == ["through the redirect", "mtls"]
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
